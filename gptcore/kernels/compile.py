"""Ahead-of-time compile gate: every cuTile kernel, for every signature the model uses, to a cubin.

    python -m gptcore.kernels.compile --arch sm_90 sm_100

Runs on a CPU-only machine (cuda-tile[tileiras] brings the compiler; no GPU, no driver needed), so
CI catches a kernel that stops compiling. Prints one line per kernel, signature and architecture
(OK/FAIL and the compile time) and exits non-zero if any failed. The signatures come from the
kernels' own launch specs (gptcore.kernels.spec), built on small CPU tensors in the model's layouts with
the tiles chosen for that architecture: arrays have a unit last stride and 16-byte aligned bases. ct.launch
also specialises a kernel on the divisibility of shapes and strides, and the model's training tensors are
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
# float16) is checked at the presets' head dim 64 and, with --full, at every head dim. Cold attention
# compiles are the slow ones, so the default set stays what the model really uses; cubins land in cuTile's
# disk cache (~/.cache/cutile-python), keyed by the exact bytecode, so a rerun on unchanged kernels is fast.
ATTN_SIGNATURES = (("bfloat16", 32), ("bfloat16", 64), ("bfloat16", 128), ("float16", 64))
ATTN_SIGNATURES_FULL = ATTN_SIGNATURES + (("float16", 32), ("float16", 128))
ATTN_ALIGNED = (("bfloat16", 64),)  # also compiled with the aligned ("16B") signature, see jobs()
ATTN_DROPOUT = (("bfloat16", 64), ("float16", 64))  # also compiled with dropout in the probabilities
LN_DTYPES = ("float32", "bfloat16", "float16")  # fp32 under autocast (residual stream), bf16/fp16 when cast
# The widths of the tiny default model (128), shakespeare_char (384), GPT-2 small (768), and one that is
# not a power of two (100: padded to 128 and masked). Only the padded width changes the kernel.
LN_WIDTHS = (100, 128, 384, 768)
# The fused forward's kernels (gptcore/fused_forward.py) at the presets' widths: shakespeare_char 384, GPT-2 768.
# Residual LayerNorm variants: (name, residual x, branch dtype or None for the matmuls' dtype, branch bias,
# residual gradient): a block's, the embeddings' (dropout of the fp32 sum, no residual yet) and the final one's
# (x_out feeds nothing, so its backward gets no residual gradient).
FUSED_WIDTHS = (384, 768)
ADL_FWD_VARIANTS = (("block", True, None, True), ("embedding", False, "float32", False))
ADL_BWD_VARIANTS = (("block", True, None, True), ("embedding", False, "float32", True), ("final", True, None, False))
CE_VOCABS = (65, 50304)  # the character vocabulary, and GPT-2's BPE rows
LCE_VOCAB = 50304  # the fused LM head + cross-entropy runs on large vocabularies only: GPT-2's
FUSED_FP16 = 384  # float16 (train.dtype float16) is checked at this width, dropout on
ALIGNED = "16B"  # the label word of the aligned signatures
FUSED_KERNEL_FILES = ("residual_layernorm", "bias_gelu", "cross_entropy", "linear_cross_entropy", "column_sums")
# The decode step's kernels (gptcore/decode_forward.py): each sublayer's linear chain at the presets' widths, with
# the LM head over the character vocabulary (384) and GPT-2's (768), at one row and 64 (the tile table's TILE_M), bf16
# in a cast model; float16 with the fp32 residual stream of autocast (verify's L4) at one width and row count.
DECODE_LINEAR_VARIANTS = ("qkv", "proj", "fc", "mproj", "head")
DECODE_HEAD_VOCAB = {384: 65, 768: 50304}
DECODE_ROWS = (1, 64)
EXAMPLE_SMS = 132  # the SM count the example launches assume (an H100 / H200): it sizes grids only


@dataclass(frozen=True)
class CompileJob:
    """One kernel signature for one architecture: the kernel and what its example launch is made of."""

    kernel: str  # e.g. "attention.fwd"
    arch: str
    dtype: str
    size: int  # attention: the head dim; LayerNorm: the width (the column sums take any width: 0)
    dropout: bool = False  # attention: dropout on the probabilities
    long: bool = False  # attention forward: a sequence long enough for the long-sequence block order
    affine: bool = True  # LayerNorm: with weight and bias (False: neither)
    aligned: bool = False  # shapes and strides multiples of 16 bytes, as training-shaped tensors are (see _array)
    variant: str = ""  # residual LayerNorm: "block", "embedding" or "final" (see ADL_FWD_VARIANTS); decode_linear's
    rows: int = 0  # decode kernels: the batch's rows

    @property
    def label(self) -> str:
        """The signature in words: `bfloat16 D=64 dropout 16B`, `float32 N=384 weight+bias`, `bfloat16 N=384 block
        dropout`, `bfloat16 V=65`."""
        if self.kernel.startswith("attention."):
            words = [f"D={self.size}"] + ["dropout"] * self.dropout + ["long"] * self.long
        elif self.kernel.startswith("residual_layernorm."):
            words = [f"N={self.size}", self.variant] + ["dropout"] * self.dropout
        elif self.kernel.startswith("bias_gelu."):
            words = [f"F={self.size}"]
        elif self.kernel.startswith(("cross_entropy.", "linear_cross_entropy.")):
            words = [f"V={self.size}"]
        elif self.kernel == "decode_linear":
            words = [self.variant, f"C={self.size}", f"M={self.rows}"]
        elif self.kernel.startswith("decode_attention"):
            words = [f"D={self.size}", f"M={self.rows}", self.variant]
        elif self.kernel == "column_sums":
            words = ["N=any"]
        else:
            size = f"N={self.size or 'any'}"
            words = [size, "weight+bias"] if self.affine else [size, "no weight, no bias"]
        return " ".join([self.dtype, *words] + [ALIGNED] * self.aligned)


@dataclass
class CompileResult:
    kernel: str
    label: str
    arch: str
    ok: bool
    seconds: float
    error: str = ""
    constants: str = ""  # the spec's compile-time constants: the tiles the kernel was built with

    def line(self) -> str:
        status = "OK  " if self.ok else "FAIL"
        tail = f"  {self.error.splitlines()[-1] if self.error else ''}" if not self.ok else ""
        return (
            f"{status} {self.arch:7s} {self.kernel:20s} {self.label:34s} {self.seconds:6.1f}s  {self.constants}{tail}"
        )


def aligned_variants(*sizes: int) -> tuple[bool, ...]:
    """The signatures a kernel launched on tensors of these sizes gets: the plain one, and the aligned one
    (see _array) when every size is a multiple of 16."""
    return (False, True) if all(size % 16 == 0 for size in sizes) else (False,)


def jobs(archs, full: bool = False) -> list[CompileJob]:
    from gptcore.kernels import attention

    out = []
    for arch in archs:
        for dt, d in ATTN_SIGNATURES_FULL if full else ATTN_SIGNATURES:
            # The aligned signature is what training-shaped tensors launch; the plain one what other shapes
            # get (a sampled prompt of 13 tokens, say). It is checked for the presets' signature only.
            tiles = attention.tiles_for(arch, d)
            for aligned in aligned_variants(d) if (dt, d) in ATTN_ALIGNED else (False,):
                for kernel in ("attention.fwd", "attention.bwd_dq", "attention.bwd_dkdv"):
                    out.append(CompileJob(kernel, arch, dt, d, aligned=aligned))
                    if (dt, d) in ATTN_DROPOUT:  # training with attention dropout (the presets' 0.2)
                        out.append(CompileJob(kernel, arch, dt, d, dropout=True, aligned=aligned))
                # The forward's block order is a kernel constant; long sequences may use another one.
                if tiles.fwd_sched_long != tiles.fwd_sched:
                    out.append(CompileJob("attention.fwd", arch, dt, d, long=True, aligned=aligned))
        for dt in LN_DTYPES:
            for n in LN_WIDTHS:
                for aligned in aligned_variants(n):
                    for kernel in ("layernorm.fwd", "layernorm.bwd"):
                        out.append(CompileJob(kernel, arch, dt, n, aligned=aligned))
        for dt in LN_DTYPES:  # the weight and bias gradients' final column sums, in the parameters' dtype
            for aligned in aligned_variants():
                out.append(CompileJob("layernorm.colsum", arch, dt, 0, aligned=aligned))
        # weight and bias None (bias=False models, and F.layer_norm without affine)
        for kernel in ("layernorm.fwd", "layernorm.bwd"):
            out.append(CompileJob(kernel, arch, "bfloat16", 384, affine=False))
        out += fused_jobs(arch)
        out += decode_jobs(arch)
    return out


def decode_jobs(arch: str) -> list[CompileJob]:
    """The decode step's kernels: every linear chain at each width and row count, attention with one split and
    with several (and their combine); float16 (autocast) at one width."""
    out = []
    for dt, widths, rows_list in (("bfloat16", FUSED_WIDTHS, DECODE_ROWS), ("float16", (FUSED_FP16,), (1,))):
        for n in widths:
            for rows in rows_list:
                out += [CompileJob("decode_linear", arch, dt, n, variant=v, rows=rows) for v in DECODE_LINEAR_VARIANTS]
        out.append(CompileJob("decode_attention", arch, dt, 64, variant="one split", rows=1))
    out.append(CompileJob("decode_attention", arch, "bfloat16", 64, variant="splits", rows=1))
    out.append(CompileJob("decode_attention.combine", arch, "bfloat16", 64, variant="splits", rows=1))
    return out


def fused_jobs(arch: str) -> list[CompileJob]:
    """The fused forward's kernels: residual LayerNorm (each variant, with dropout and without: eval), bias +
    GELU on the MLP's 4x width, cross-entropy over each vocabulary, the column sums; bf16, and float16 at one
    width."""
    out = []
    for dt in ("bfloat16", "float16"):
        widths = FUSED_WIDTHS if dt == "bfloat16" else (FUSED_FP16,)
        for n in widths:
            for kernel, variants in (("fwd", ADL_FWD_VARIANTS), ("bwd", ADL_BWD_VARIANTS)):
                for variant in variants:
                    for dropout in (True, False) if dt == "bfloat16" else (True,):
                        for aligned in aligned_variants(n):
                            out.append(
                                CompileJob(f"residual_layernorm.{kernel}", arch, dt, n, dropout, aligned=aligned,
                                           variant=variant[0])
                            )  # fmt: skip
            for kernel in ("bias_gelu.fwd", "bias_gelu.bwd"):
                out += [CompileJob(kernel, arch, dt, 4 * n, aligned=a) for a in aligned_variants(4 * n)]
        for v in CE_VOCABS if dt == "bfloat16" else CE_VOCABS[:1]:
            for kernel in ("cross_entropy.fwd", "cross_entropy.bwd"):
                out += [CompileJob(kernel, arch, dt, v, aligned=a) for a in aligned_variants(v)]
        # the fused LM head's loss-and-gradient kernel: GPT-2's vocabulary, in either half dtype
        lce = "linear_cross_entropy.grad"
        out += [CompileJob(lce, arch, dt, LCE_VOCAB, aligned=a) for a in aligned_variants(LCE_VOCAB)]
    out.append(CompileJob("column_sums", arch, "float32", 0))
    return out


# ---- a job's example launch and its signature ---------------------------------------------------------------


def example_spec(job: CompileJob):
    """The LaunchSpec of a launch of `job`'s signature, built by the kernel's own spec function on small CPU
    tensors of the model's layouts (q, k, v as views of one c_attn output): only their dtypes, ranks,
    shapes and strides reach the signature."""
    import torch

    from gptcore.kernels import attention as A
    from gptcore.kernels import layernorm as L

    dtype = getattr(torch, job.dtype)
    if job.kernel.split(".")[0] in FUSED_KERNEL_FILES:
        return fused_example_spec(job, dtype)
    if job.kernel.startswith("decode_"):
        return decode_example_spec(job, dtype)
    if job.kernel.startswith("attention."):
        tiles = A.tiles_for(job.arch, job.size)
        b, h, d = 1, 2, job.size
        t = tiles.fwd_long_from if job.long else 64
        qkv = torch.empty(b, t, 3 * h * d, dtype=dtype)
        q, k, v = (x.view(b, t, h, d).transpose(1, 2) for x in qkv.split(h * d, dim=2))
        rng = torch.empty(2, dtype=torch.int64) if job.dropout else None
        common = dict(scale=d**-0.5, dropout_p=0.2 if job.dropout else 0.0, tiles=tiles)
        o, stats = A.fwd_outputs(q)
        if job.kernel == "attention.fwd":
            return A.fwd_spec(q, k, v, o, stats, rng, **common)
        dq, dk, dv, delta = A.bwd_outputs(q)
        if job.kernel == "attention.bwd_dq":
            return A.bwd_dq_spec(q, k, v, o, o, stats, delta, dq, rng, **common)
        return A.bwd_dkdv_spec(q, k, v, o, stats, delta, dk, dv, rng, **common)
    n = job.size or 384  # the column sums take any width
    tiles = L.tiles_for(job.arch, n)
    x2 = torch.empty(64, n, dtype=dtype)
    weight, bias = (torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)) if job.affine else (None, None)
    y, stats = L.fwd_outputs(x2)
    if job.kernel == "layernorm.fwd":
        return L.fwd_spec(x2, weight, bias, y, stats, eps=1e-5, tiles=tiles, sm_count=EXAMPLE_SMS)
    dx, parts = L.bwd_outputs(x2, L.bwd_blocks(64, tiles, EXAMPLE_SMS))
    if job.kernel == "layernorm.bwd":
        return L.bwd_spec(x2, weight, y, stats, dx, parts, has_bias=bias is not None, tiles=tiles)
    return L.colsum_spec(parts, weight, bias)


def fused_example_spec(job: CompileJob, dtype):
    """The fused forward's kernels' example launches: 64 rows of the model's tensors (fp32 residual stream and
    parameters, activations in the job's dtype)."""
    import torch

    from gptcore.kernels import bias_gelu, column_sums, cross_entropy, linear_cross_entropy
    from gptcore.kernels import residual_layernorm as R

    rows = 64
    if job.kernel == "column_sums":
        parts = torch.empty(R.PARTIAL_SUMS, 2 * EXAMPLE_SMS, 384)
        return column_sums.colsum_spec(parts, torch.empty(R.PARTIAL_SUMS, 384))
    if job.kernel.startswith("bias_gelu."):
        tiles = bias_gelu.tiles_for(job.arch)
        u, bias = torch.empty(rows, job.size, dtype=dtype), torch.empty(job.size)
        if job.kernel == "bias_gelu.fwd":
            return bias_gelu.fwd_spec(u, bias, torch.empty_like(u), tiles=tiles)
        parts = torch.empty(1, bias_gelu.bwd_groups(rows, job.size, tiles, EXAMPLE_SMS), job.size)
        return bias_gelu.bwd_spec(u, bias, u, torch.empty_like(u), parts, tiles=tiles)
    if job.kernel == "linear_cross_entropy.grad":
        tiles = linear_cross_entropy.tiles_for(job.arch, job.size)
        logits, targets = torch.empty(rows, job.size, dtype=dtype), torch.empty(rows, dtype=torch.int64)
        loss = torch.empty(rows)
        return linear_cross_entropy.grad_spec(logits, targets, loss, ignore_index=-1, tiles=tiles)
    if job.kernel.startswith("cross_entropy."):
        tiles = cross_entropy.tiles_for(job.arch)
        logits, targets = torch.empty(rows, job.size, dtype=dtype), torch.empty(rows, dtype=torch.int64)
        loss, lse = cross_entropy.fwd_outputs(logits)
        if job.kernel == "cross_entropy.fwd":
            return cross_entropy.fwd_spec(logits, targets, loss, lse, ignore_index=-1, tiles=tiles)
        return cross_entropy.bwd_spec(logits, targets, lse, torch.empty(1), logits, ignore_index=-1, tiles=tiles)
    n, p = job.size, 0.2 if job.dropout else 0.0
    tiles = R.tiles_for(job.arch, n)
    variants = ADL_FWD_VARIANTS if job.kernel == "residual_layernorm.fwd" else ADL_BWD_VARIANTS
    _, has_x, branch_dtype, third = next(v for v in variants if v[0] == job.variant)
    branch = torch.empty(rows, n, dtype=getattr(torch, branch_dtype) if branch_dtype else dtype)
    x, params = torch.empty(rows, n), torch.empty(n)
    rng = torch.empty(2, dtype=torch.int64) if job.dropout else None
    x_out, y, stats = R.fwd_outputs(branch, torch.float32, dtype)
    if job.kernel == "residual_layernorm.fwd":  # third: a branch bias
        return R.fwd_spec(
            x if has_x else None, branch, params if third else None, params, params, rng, x_out, y, stats,
            eps=1e-5, p=p, tiles=tiles, sm_count=EXAMPLE_SMS,
        )  # fmt: skip
    parts = torch.empty(R.PARTIAL_SUMS, R.bwd_blocks(rows, tiles, EXAMPLE_SMS), n)
    dx_out = torch.empty_like(x_out) if third else None  # third: the residual's gradient
    dx = torch.empty_like(x_out) if has_x else None
    return R.bwd_spec(x_out, params, stats, rng, y, dx_out, dx, branch, parts, p=p, tiles=tiles)


def decode_example_spec(job: CompileJob, dtype):
    """The decode kernels' example launches: `job.rows` rows of width job.size; the residual stream and LayerNorm
    parameters in fp32 under float16 (autocast), in the half dtype otherwise (a cast model)."""
    import torch

    from gptcore.kernels import decode_attention, decode_linear

    rows, c = job.rows, job.size
    stream = torch.float32 if dtype == torch.float16 else dtype
    if job.kernel == "decode_linear":
        k, n = {"qkv": (c, 3 * c), "proj": (c, c), "fc": (c, 4 * c), "mproj": (4 * c, c)}.get(
            job.variant, (c, DECODE_HEAD_VOCAB[c])
        )
        x = torch.empty(rows, k, dtype=stream if job.variant in ("qkv", "fc", "head") else dtype)
        weight, bias, ln = torch.empty(n, k, dtype=dtype), torch.empty(n, dtype=stream), torch.empty(k, dtype=stream)
        residual = torch.empty(rows, n, dtype=stream) if job.variant in ("proj", "mproj") else None
        has_ln = job.variant in ("qkv", "fc", "head")
        tiles = decode_linear.tiles_for(job.arch)
        return decode_linear.spec(
            x, weight, None if job.variant == "head" else bias, ln if has_ln else None, ln if has_ln else None,
            residual, decode_linear.output(x, weight, residual), eps=1e-5, gelu=job.variant == "fc", tiles=tiles,
            sms=EXAMPLE_SMS,
        )  # fmt: skip
    n_head, hd, length = 12, job.size, 1024
    qkv = torch.empty(rows, 3 * n_head * hd, dtype=dtype)
    cache = torch.empty(rows, n_head, length, hd, dtype=dtype)
    splits = 4 if job.variant == "splits" else 1
    o, part_o, part_ml = decode_attention.outputs(qkv, n_head, splits)
    if job.kernel == "decode_attention.combine":
        return decode_attention.combine_spec(part_o, part_ml, o)
    tiles = decode_attention.tiles_for(job.arch)
    return decode_attention.spec(
        decode_attention.heads_view(qkv, n_head), cache, cache, o, part_o, part_ml, pos=length - 1,
        per_split=length // tiles.tile_n // splits, tiles=tiles,
    )  # fmt: skip


def _array(tensor, aligned: bool):
    """An array parameter: the tensor's dtype and rank, a unit last stride and a 16-byte aligned base. With
    `aligned`, also the divisibility ct.launch specialises a kernel on (it picks TMA copies then): the
    tensor's strides that are multiples of 16 bytes and its dims that are multiples of 16."""
    import cuda.tile as ct
    from cuda.tile.compilation import ArrayConstraint

    from gptcore.devices import dtype_name

    ndim = tensor.dim()
    divisible = {}
    if aligned:
        per_16_bytes = max(1, 16 // tensor.element_size())
        strides = [per_16_bytes if s % per_16_bytes == 0 else 1 for s in tensor.stride()[:-1]]
        divisible = dict(
            stride_divisible_by=(*strides, 1),
            shape_divisible_by=tuple(16 if size % 16 == 0 else 1 for size in tensor.shape),
        )
    return ArrayConstraint(
        getattr(ct, dtype_name(tensor.dtype)),
        ndim,
        index_dtype=ct.int32,
        stride_lower_bound_incl=0,
        alias_groups=(),
        may_alias_internally=False,
        stride_constant=(None,) * (ndim - 1) + (1,),
        base_addr_divisible_by=16,
        **divisible,
    )


def signature(spec, aligned: bool = False):
    """The ahead-of-time KernelSignature of a LaunchSpec: constants as their values, tensors as arrays (see
    _array), Python floats and ints as the fp32 and int32 scalars ct.launch passes them as."""
    import cuda.tile as ct
    import torch
    from cuda.tile.compilation import CallingConvention, KernelSignature, ScalarConstraint

    from gptcore.kernels.spec import parameters

    params = []
    for name, constant in parameters(spec.body):
        value = spec.args[name]
        if constant:
            params.append(value)
        elif isinstance(value, torch.Tensor):
            params.append(_array(value, aligned))
        elif isinstance(value, float):
            params.append(ScalarConstraint(ct.float32))
        elif isinstance(value, int) and not isinstance(value, bool):
            params.append(ScalarConstraint(ct.int32))
        else:
            raise TypeError(f"{spec.name}: argument {name} = {value!r} is not a tensor, a float or an int")
    return KernelSignature(params, CallingConvention.cutile_python_v1()).with_mangled_symbol(spec.name)


def compile_one(job: CompileJob, out_dir: str | None = None) -> CompileResult:
    from cuda.tile.compilation import export_kernel

    from gptcore.kernels.spec import parameters

    t0 = time.perf_counter()
    constants = ""
    try:
        spec = example_spec(job)
        constants = " ".join(f"{n}={spec.args[n]}" for n, constant in parameters(spec.body) if constant)
        sig = signature(spec, job.aligned)
        spec.ordered_args()  # the spec names every argument the kernel takes
        with tempfile.TemporaryDirectory() as tmp:
            safe = "".join(c if c.isalnum() or c in "=." else "_" for c in job.label)
            path = Path(out_dir or tmp) / f"{job.kernel}.{safe}.{job.arch}.cubin"
            export_kernel(spec.kernel, [sig], str(path), gpu_code=job.arch, output_format="cubin")
            if path.stat().st_size == 0:
                raise RuntimeError("empty cubin")
        return CompileResult(job.kernel, job.label, job.arch, True, time.perf_counter() - t0, constants=constants)
    except Exception:  # noqa: BLE001 - the gate reports every failure and goes on
        seconds = time.perf_counter() - t0
        return CompileResult(job.kernel, job.label, job.arch, False, seconds, traceback.format_exc(), constants)


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
