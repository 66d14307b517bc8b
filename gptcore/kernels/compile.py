"""Ahead-of-time compile gate: every cuTile kernel, for every signature the model uses, to a cubin.

    python -m gptcore.kernels.compile --arch sm_90 sm_100

Runs on a CPU-only machine (cuda-tile[tileiras] brings the compiler; no GPU, no driver needed), so
CI catches a kernel that stops compiling. Prints one line per kernel, signature and architecture
(OK/FAIL and the compile time) and exits non-zero if any failed. The signatures mirror what the
launch helpers pass: the tile constants are the ones chosen for that architecture, arrays have a
unit last stride (the model's strided q/k/v views included) and 16-byte aligned bases. ct.launch also
specialises a kernel on the divisibility of shapes and strides, and the model's training tensors are
aligned (widths and sequence lengths multiples of 16): that signature compiles to other code (TMA copies),
so the gate checks it too, as the "16B" labels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARCHS = ("sm_90", "sm_100")
# Attention: bf16 is what the model runs (autocast on any GPU cuTile supports); fp16 (train.dtype
# float16) is checked at the presets' head dim 64 and, with --full, at every head dim. Attention
# kernels take 5-30 s each in tileiras on a 2-core machine, so the default set stays what the model
# really uses; cubins land in cuTile's disk cache (~/.cache/cutile-python), so a rerun on unchanged
# kernels is fast and a changed kernel always recompiles (the cache key is the exact bytecode).
ATTN_SIGNATURES = (("bfloat16", 32), ("bfloat16", 64), ("bfloat16", 128), ("float16", 64))
ATTN_SIGNATURES_FULL = ATTN_SIGNATURES + (("float16", 32), ("float16", 128))
ATTN_ALIGNED = (("bfloat16", 64),)  # also compiled with the aligned ("16B") signature, see jobs()
ATTN_DROPOUT = (("bfloat16", 64), ("float16", 64))  # also compiled with dropout in the probabilities
LN_DTYPES = ("float32", "bfloat16", "float16")  # fp32 under autocast (residual stream), bf16/fp16 when cast
# The widths of the tiny default model (128), shakespeare_char (384), GPT-2 small (768), and one that is
# not a power of two (100: padded to 128 and masked). Only the padded width changes the kernel.
LN_WIDTHS = (100, 128, 384, 768)


@dataclass(frozen=True)
class CompileJob:
    kernel: str  # e.g. "attention.fwd"
    label: str  # human-readable signature
    arch: str


@dataclass
class CompileResult:
    kernel: str
    label: str
    arch: str
    ok: bool
    seconds: float
    error: str = ""
    tiles: str = ""

    def line(self) -> str:
        status = "OK  " if self.ok else "FAIL"
        tail = f"  {self.error.splitlines()[-1] if self.error else ''}" if not self.ok else ""
        return f"{status} {self.arch:7s} {self.kernel:20s} {self.label:34s} {self.tiles:28s} {self.seconds:6.1f}s{tail}"


def _array(ct, dtype, ndim: int, shape16: tuple[bool, ...] | None = None):
    """An array parameter: unit last stride and a 16-byte aligned base. With shape16 (the "16B" signatures),
    also what ct.launch assumes of the model's usual tensors and specialises the kernel on (it picks TMA
    copies then): every other stride a multiple of 16 bytes and the dims flagged True multiples of 16."""
    from cuda.tile.compilation import ArrayConstraint

    aligned = {}
    if shape16 is not None:
        aligned = dict(
            stride_divisible_by=(128 // dtype.bitwidth,) * (ndim - 1) + (1,),
            shape_divisible_by=tuple(16 if d else 1 for d in shape16),
        )
    return ArrayConstraint(
        dtype,
        ndim,
        index_dtype=ct.int32,
        stride_lower_bound_incl=0,
        alias_groups=(),
        may_alias_internally=False,
        stride_constant=(None,) * (ndim - 1) + (1,),
        base_addr_divisible_by=16,
        **aligned,
    )


ALIGNED = "16B"  # the label word of the aligned signatures


def signature_suffixes(*sizes: int) -> tuple[str, ...]:
    """The label suffixes of a kernel launched on tensors of these sizes: the plain signature, and the
    aligned one (see _array) when every size is a multiple of 16."""
    return ("", f" {ALIGNED}") if all(size % 16 == 0 for size in sizes) else ("",)


def jobs(archs, full: bool = False) -> list[CompileJob]:
    from gptcore.kernels import attention

    out = []
    for arch in archs:
        for dt, d in ATTN_SIGNATURES_FULL if full else ATTN_SIGNATURES:
            # "16B": the aligned signature that training-shaped tensors launch (see _array); the plain one
            # is what other shapes get (a sampled prompt of 13 tokens, say). Cold attention compiles are
            # slow, so the aligned one is checked for the presets' signature (bf16, D=64) only.
            tiles = attention.tiles_for(arch, d)
            for suffix in signature_suffixes(d) if (dt, d) in ATTN_ALIGNED else ("",):
                for kern in ("attention.fwd", "attention.bwd_dq", "attention.bwd_dkdv"):
                    out.append(CompileJob(kern, f"{dt} D={d}{suffix}", arch))
                    if (dt, d) in ATTN_DROPOUT:  # training with attention dropout (the presets' 0.2)
                        out.append(CompileJob(kern, f"{dt} D={d} dropout{suffix}", arch))
                # The forward's block order is a kernel constant; long sequences may use another one.
                if tiles.fwd_sched_long != tiles.fwd_sched:
                    out.append(CompileJob("attention.fwd", f"{dt} D={d} long{suffix}", arch))
        for dt in LN_DTYPES:
            for n in LN_WIDTHS:
                for suffix in signature_suffixes(n):
                    for kern in ("layernorm.fwd", "layernorm.bwd"):
                        out.append(CompileJob(kern, f"{dt} N={n} weight+bias{suffix}", arch))
        for dt in LN_DTYPES:  # the weight and bias gradients' final column sums, in the parameters' dtype
            for suffix in signature_suffixes():
                out.append(CompileJob("layernorm.colsum", f"{dt} N=any weight+bias{suffix}", arch))
        # weight and bias None (bias=False models, and F.layer_norm without affine)
        out.append(CompileJob("layernorm.fwd", "bfloat16 N=384 no weight, no bias", arch))
        out.append(CompileJob("layernorm.bwd", "bfloat16 N=384 no weight, no bias", arch))
    return out


def _signature_and_kernel(job: CompileJob):
    import cuda.tile as ct
    from cuda.tile.compilation import CallingConvention, KernelSignature, ScalarConstraint

    from gptcore.kernels import attention, layernorm

    cc = CallingConvention.cutile_python_v1()
    f32 = ScalarConstraint(ct.float32)
    i32 = ScalarConstraint(ct.int32)
    words = job.label.split()
    dt = getattr(ct, words[0])
    aligned = ALIGNED in words  # (B, H, T, D) and (M, N) arrays: T, D, M and N multiples of 16, strides aligned
    if job.kernel.startswith("attention."):
        d = int(words[1].split("=")[1])
        tiles = attention.tiles_for(job.arch, d)
        a4 = _array(ct, dt, 4, (False, False, True, True) if aligned else None)
        a3 = _array(ct, ct.float32, 3, (False, False, True) if aligned else None)  # delta (B, H, T)
        stats = _array(ct, ct.float32, 4, (False, False, False, True) if aligned else None)  # (2, B, H, T)
        dropout = "dropout" in words
        # the dropout keys (int64 (2,)); without dropout the stats array stands in, as in the launch helpers
        rng = _array(ct, ct.int64, 1) if dropout else stats
        drop = [f32, i32]  # keep_scale, drop_threshold
        if job.kernel == "attention.fwd":
            kern = attention.fwd_kernel(tiles.fwd_occ)
            sched = tiles.fwd_sched_long if "long" in words else tiles.fwd_sched
            params = [a4, a4, a4, a4, stats, rng, f32, *drop, d, tiles.fwd_m, tiles.fwd_n, sched, dropout]
            desc = f"M{tiles.fwd_m} N{tiles.fwd_n} occ{tiles.fwd_occ} sched{sched}"
        elif job.kernel == "attention.bwd_dq":
            kern = attention.bwd_dq_kernel(tiles.dq_occ)
            params = [
                a4,
                a4,
                a4,
                a4,
                a4,
                stats,
                a3,
                a4,
                rng,
                f32,
                f32,
                *drop,
                d,
                tiles.dq_m,
                tiles.dq_n,
                tiles.bwd_sched,
                dropout,
            ]
            desc = f"M{tiles.dq_m} N{tiles.dq_n} occ{tiles.dq_occ} sched{tiles.bwd_sched}"
        else:
            kern = attention.bwd_dkdv_kernel(tiles.dkv_occ)
            params = [
                a4,
                a4,
                a4,
                a4,
                stats,
                a3,
                a4,
                a4,
                rng,
                f32,
                f32,
                *drop,
                d,
                tiles.dkv_m,
                tiles.dkv_n,
                tiles.bwd_sched,
                dropout,
            ]
            desc = f"M{tiles.dkv_m} N{tiles.dkv_n} occ{tiles.dkv_occ} sched{tiles.bwd_sched}"
    else:
        n = 0 if words[1] == "N=any" else int(words[1].split("=")[1])  # the column sums: any width
        affine = "no" not in words  # "no weight, no bias": both None, dummy fp32 arrays stand in
        tiles = layernorm.tiles_for(job.arch, max(n, 1))
        # Missing weight / bias: the stats array (2-D fp32) stands in, as in the launch helpers.
        x2 = _array(ct, dt, 2, (True, True) if aligned else None)  # (M, N)
        f2 = _array(ct, ct.float32, 2, (False, True) if aligned else None)  # stats (2, M)
        f3 = _array(ct, ct.float32, 3, (False, False, True) if aligned else None)  # column-sum partials (2, G, N)
        p1 = _array(ct, dt, 1, (True,) if aligned else None) if affine else f2
        if job.kernel == "layernorm.colsum":
            kern = layernorm.colsum_kernel()
            params = [f3, p1, p1, layernorm.COLSUM_TILE_G, layernorm.COLSUM_TILE_N, True, True]
            desc = f"G{layernorm.COLSUM_TILE_G} N{layernorm.COLSUM_TILE_N}"
        elif job.kernel == "layernorm.fwd":
            c, k, pad_last = layernorm.fwd_chunks(n, tiles.fwd_chunk)
            kern = layernorm.fwd_kernel(tiles.fwd_occ, tiles.fwd_warps)
            params = [x2, p1, p1, x2, f2, f32, c, k, pad_last, tiles.fwd_rows, affine, affine, tiles.fwd_latency]
            desc = (
                f"rows{tiles.fwd_rows} chunks{k}x{c}{'(padded)' if pad_last else ''} occ{tiles.fwd_occ} "
                f"warps{tiles.fwd_warps or 'auto'} latency{tiles.fwd_latency}"
            )
        else:
            pad = layernorm.next_pow2(n)
            kern = layernorm.bwd_kernel(tiles.bwd_occ, tiles.bwd_warps)
            params = [x2, p1, x2, f2, x2, f3, pad, tiles.bwd_rows, affine, affine, tiles.bwd_latency, tiles.bwd_defer]
            desc = (
                f"rows{tiles.bwd_rows} pad{pad} occ{tiles.bwd_occ} warps{tiles.bwd_warps or 'auto'} "
                f"latency{tiles.bwd_latency}{' deferred' if tiles.bwd_defer else ''}"
            )
    name = kern._annotated_function.pyfunc.__name__
    return kern, KernelSignature(params, cc).with_mangled_symbol(name), desc


def compile_one(job: CompileJob, out_dir: str | None = None) -> CompileResult:
    from cuda.tile.compilation import export_kernel

    t0 = time.perf_counter()
    desc = ""
    try:
        kern, sig, desc = _signature_and_kernel(job)
        with tempfile.TemporaryDirectory() as tmp:
            safe = "".join(c if c.isalnum() or c in "=." else "_" for c in job.label)
            path = Path(out_dir or tmp) / f"{job.kernel}.{safe}.{job.arch}.cubin"
            export_kernel(kern, [sig], str(path), gpu_code=job.arch, output_format="cubin")
            if path.stat().st_size == 0:
                raise RuntimeError("empty cubin")
        return CompileResult(job.kernel, job.label, job.arch, True, time.perf_counter() - t0, tiles=desc)
    except Exception:  # noqa: BLE001 - the gate reports every failure and goes on
        return CompileResult(
            job.kernel, job.label, job.arch, False, time.perf_counter() - t0, traceback.format_exc(), tiles=desc
        )


def compile_all(
    archs=DEFAULT_ARCHS,
    workers: int | None = None,
    out_dir: str | None = None,
    verbose: bool = False,
    full: bool = False,
) -> list[CompileResult]:
    """Compile every kernel signature for every arch; returns one CompileResult per job."""
    todo = jobs(archs, full)
    if workers is None:
        import os

        workers = max(1, min(len(todo), os.cpu_count() or 1))
    results = []
    if workers == 1:
        for job in todo:
            r = compile_one(job, out_dir)
            results.append(r)
            if verbose:
                print(r.line(), flush=True)
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for r in pool.map(compile_one, todo, [out_dir] * len(todo)):
            results.append(r)
            if verbose:
                print(r.line(), flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="e.g. sm_90 sm_100")
    ap.add_argument("--workers", type=int, default=None, help="parallel compiler processes (default: CPUs)")
    ap.add_argument("--out", default=None, help="keep the cubins here (default: a temp dir, removed)")
    ap.add_argument("--full", action="store_true", help="also fp16 attention at head dims 32 and 128")
    ap.add_argument("--no-cache", action="store_true", help="bypass cuTile's disk cache (always run tileiras)")
    args = ap.parse_args(argv)
    if args.no_cache:
        import os

        os.environ["CUDA_TILE_CACHE_DIR"] = "off"  # read when cuda.tile is first imported (below, lazily)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = compile_all(args.arch, args.workers, args.out, verbose=True, full=args.full)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n--- {r.arch} {r.kernel} {r.label} ---\n{r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)}/{len(results)} compiled OK in {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
