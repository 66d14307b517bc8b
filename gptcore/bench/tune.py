"""Tile sweeps: time every candidate configuration of a kernel (CUDA-graph replay, GPU time only) and hand
back the fastest as an explicit config (an AttnTiles or LNTiles), without touching the kernels' tables.

    python -m gptcore.bench.tune [attention|layernorm|residual_layernorm|bias_gelu|linear_cross_entropy|all]
                                 [--json PATH]

prints the ranking of each kernel and the chosen configs, ready to go into the architecture's table in
gptcore/kernels/attention.py, layernorm.py, residual_layernorm.py, bias_gelu.py or linear_cross_entropy.py (with
the records, as data,
in results/). Every candidate runs
through the kernels' launch helpers, and so through their launch specs, with its config by keyword.

Compiling every candidate serially takes minutes, so a pool of processes first launches each once, which
fills cuTile's disk cache; the timed launches then find their cubins there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import torch

from gptcore.bench.timing import OK, Recorder, Timer, synchronize
from gptcore.devices import DTYPES, dtype_name
from gptcore.kernels import attention, bias_gelu, layernorm
from gptcore.kernels import linear_cross_entropy as head
from gptcore.kernels import residual_layernorm as residual
from gptcore.kernels.attention import HEAD_MAJOR, LONGEST_FIRST
from gptcore.kernels.runtime import current_arch

ATTN_TUNE_SHAPES = ((16, 12, 1024, 64), (8, 12, 2048, 64))  # (B, H, T, D): the table holds the T1024 winners
LN_TUNE_SHAPES = ((16384, 384), (16384, 768))  # (rows, width): the "small" and "large" entries
# The fused forward's kernels at the two presets' training steps: shakespeare_char (B64 T256, 384 wide, MLP 1536)
# and GPT-2 small (B12 T1024, 768 wide, MLP 3072).
RESIDUAL_TUNE_SHAPES = ((16384, 384), (12288, 768))
GELU_TUNE_SHAPES = ((16384, 1536), (12288, 3072))
# The fused LM head's loss-and-gradient kernel on one chunk of GPT-2 small's training batch (rows x vocabulary).
HEAD_TUNE_SHAPES = ((2560, 50304),)
RESIDUAL_DROPOUT = 0.2  # the residual LayerNorm is timed as training runs it, with the presets' dropout

# Candidates, each a set of fields replaced in the architecture's current config.
ATTN_FWD = [
    dict(fwd_m=m, fwd_n=n, fwd_occ=occ, fwd_sched=order, fwd_sched_long=order)
    for m, n, occ, order in (
        (128, 64, 2, HEAD_MAJOR),
        (128, 64, 2, LONGEST_FIRST),
        (64, 128, 2, HEAD_MAJOR),
        (64, 128, 2, LONGEST_FIRST),
        (128, 128, 1, HEAD_MAJOR),
        (128, 128, 2, HEAD_MAJOR),
        (64, 64, 2, HEAD_MAJOR),
        (64, 64, 4, HEAD_MAJOR),
        (128, 64, 1, HEAD_MAJOR),
        (64, 128, 3, HEAD_MAJOR),
        (128, 32, 2, HEAD_MAJOR),
        (64, 64, 4, LONGEST_FIRST),
        (64, 64, 3, HEAD_MAJOR),
        (64, 32, 4, HEAD_MAJOR),
    )
]
ATTN_DQ = [
    dict(dq_m=m, dq_n=n, dq_occ=occ, bwd_sched=order)
    for m, n, occ, order in (
        (128, 64, 2, HEAD_MAJOR),
        (128, 64, 2, LONGEST_FIRST),
        (64, 64, 2, HEAD_MAJOR),
        (64, 64, 2, LONGEST_FIRST),
        (64, 128, 2, HEAD_MAJOR),
        (128, 64, 1, HEAD_MAJOR),
        (128, 128, 1, HEAD_MAJOR),
        (64, 64, 4, HEAD_MAJOR),
        (128, 32, 2, HEAD_MAJOR),
    )
]
ATTN_DKV = [
    dict(dkv_m=m, dkv_n=n, dkv_occ=occ, bwd_sched=order)
    for m, n, occ, order in (
        (128, 64, 2, HEAD_MAJOR),
        (128, 64, 2, LONGEST_FIRST),
        (64, 64, 2, HEAD_MAJOR),
        (64, 64, 2, LONGEST_FIRST),
        (64, 128, 2, HEAD_MAJOR),
        (32, 128, 2, HEAD_MAJOR),
        (128, 64, 1, HEAD_MAJOR),
        (128, 128, 1, HEAD_MAJOR),
        (64, 64, 4, HEAD_MAJOR),
        (32, 64, 4, HEAD_MAJOR),
    )
]
LN_FWD = [
    dict(fwd_rows=rows, fwd_occ=occ, fwd_warps=warps, fwd_blocks_per_sm=per_sm, fwd_latency=latency)
    for rows, occ, warps, per_sm, latency in (
        (16, 4, None, 0, 0),
        (8, 4, None, 0, 0),
        (32, 2, None, 0, 0),
        (16, 4, None, 4, 3),
        (16, 4, None, 4, 6),
        (8, 4, None, 4, 3),
        (8, 4, None, 4, 4),
        (8, 4, None, 4, 6),
        (16, 2, None, 2, 4),
        (16, 2, 8, 2, 4),
        (16, 2, 8, 2, 6),
        (32, 2, 8, 2, 4),
        (32, 1, 8, 1, 6),
        (16, 1, 8, 1, 4),
    )
]
LN_BWD = [
    dict(bwd_rows=rows, bwd_occ=occ, bwd_blocks_per_sm=per_sm, bwd_latency=latency, bwd_defer=defer, bwd_warps=warps)
    for rows, occ, per_sm, latency, defer, warps in (
        (32, 1, 1, 4, True, 8),
        (32, 1, 1, 2, True, 8),
        (16, 1, 1, 4, True, 8),
        (16, 2, 2, 4, True, None),
        (8, 2, 2, 4, True, None),
        (16, 2, 2, 4, False, None),
        (8, 2, 2, 4, False, None),
        (8, 2, 2, 6, False, None),
        (4, 2, 2, 4, False, None),
        (4, 4, 4, 4, False, None),
        (16, 1, 1, 4, False, 8),
        (8, 1, 1, 4, False, 8),
        (16, 2, 8, 0, False, None),
    )
]


RESIDUAL_FWD = [
    dict(fwd_rows=rows, fwd_occ=occ, fwd_blocks_per_sm=per_sm, fwd_latency=latency)
    for rows, occ, per_sm, latency in (
        (16, 4, 4, 3),
        (8, 4, 4, 3),
        (8, 4, 4, 4),
        (16, 4, 0, 0),
        (8, 4, 0, 0),
        (16, 2, 2, 4),
        (32, 2, 2, 4),
        (4, 4, 8, 3),
    )
]
RESIDUAL_BWD = [
    dict(bwd_rows=rows, bwd_occ=occ, bwd_blocks_per_sm=per_sm, bwd_latency=latency)
    for rows, occ, per_sm, latency in (
        (16, 2, 2, 4),
        (8, 2, 2, 4),
        (8, 4, 4, 4),
        (4, 4, 4, 4),
        (16, 1, 1, 4),
        (32, 1, 1, 4),
        (8, 2, 2, 0),
        (4, 2, 4, 2),
    )
]
GELU = [
    dict(fwd_rows=rows, fwd_cols=cols, fwd_occ=occ, bwd_rows=rows, bwd_cols=cols, bwd_occ=occ, bwd_blocks_per_sm=per_sm)
    for rows, cols, occ, per_sm in (
        (64, 128, 2, 4),
        (32, 128, 4, 4),
        (32, 256, 2, 4),
        (64, 64, 4, 4),
        (128, 64, 2, 4),
        (16, 256, 4, 8),
        (64, 128, 2, 2),
        (32, 128, 4, 8),
    )
]
HEAD = [
    dict(rows=rows, max_chunk=chunk, occ=occ)
    for rows, chunk, occ in (
        (32, 256, None),
        (8, 1024, None),
        (4, 2048, None),
        (2, 4096, None),
        (2, 4096, 2),
        (2, 4096, 4),
        (1, 4096, None),
        (1, 4096, 4),
        (1, 8192, None),
        (1, 8192, 2),
        (2, 8192, None),
        (4, 4096, None),
        (4, 4096, 2),
        (1, 16384, None),
    )  # fmt: skip
]


def label(changes: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in changes.items())


def shape_label(kernel: str, shape) -> str:
    """B16xH12xT1024xD64 (attention) or N16384xC768 (LayerNorm rows x width)."""
    return "x".join(f"{axis}{size}" for axis, size in zip("BHTD" if kernel == "attention" else "NC", shape))


def residual_inputs(shape, dtype, device, seed=0) -> dict:
    """A block's residual LayerNorm as training runs it: fp32 residual x and parameters, the branch in `dtype`,
    dropout on; the forward's outputs (with the table config) and upstream gradients for the backward."""
    m, n = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, dt=torch.float32):
        return torch.randn(*size, device=device, generator=gen).to(dt)

    x = dict(x=randn(m, n), branch=randn(m, n, dt=dtype), bb=randn(n), w=1 + 0.1 * randn(n), b=0.1 * randn(n))
    x["rng"] = torch.tensor([1234, 5678], device=device)
    x["x_out"], _, x["stats"] = residual.forward_rows(
        x["x"], x["branch"], x["bb"], x["w"], x["b"], x["rng"], p=RESIDUAL_DROPOUT, eps=1e-5, out_dtype=dtype
    )
    x.update(dy=randn(m, n, dt=dtype), dx_out=randn(m, n), dtype=dtype)
    return x


def residual_call(part: str, tiles, x: dict):
    if part == "fwd":
        return lambda: residual.forward_rows(
            x["x"], x["branch"], x["bb"], x["w"], x["b"], x["rng"], p=RESIDUAL_DROPOUT, eps=1e-5,
            out_dtype=x["dtype"], tiles=tiles,
        )  # fmt: skip
    return lambda: residual.backward_rows(
        x["x_out"], x["w"], x["stats"], x["rng"], x["dy"], x["dx_out"], p=RESIDUAL_DROPOUT, has_x=True,
        branch_dtype=x["dtype"], tiles=tiles,
    )  # fmt: skip


def gelu_inputs(shape, dtype, device, seed=0) -> dict:
    """u (M, F) in `dtype`, an fp32 bias, and an upstream gradient."""
    m, f = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(m, f, device=device, generator=gen).to(dtype)
    return dict(u=u, bias=torch.randn(f, device=device, generator=gen), dg=torch.randn_like(u))


def gelu_call(part: str, tiles, x: dict):
    if part == "fwd":
        return lambda: bias_gelu.forward_rows(x["u"], x["bias"], tiles=tiles)
    return lambda: bias_gelu.backward_rows(x["u"], x["bias"], x["dg"], tiles=tiles)


# ---- one candidate's call, the same for compiling it first and for timing it -------------------------------


def attention_inputs(shape, dtype, device, seed=0) -> dict:
    """Random q, k, v, dO of `shape` (B, H, T, D), and the forward's o and stats on them (the backward's
    inputs, laid out as the forward writes them), computed with the architecture's table config."""
    b, h, t, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
    scale = 1 / math.sqrt(d)
    o, stats = attention.attention_forward(q, k, v, scale=scale)
    return dict(q=q, k=k, v=v, do=do, o=o, stats=stats, scale=scale)


def attention_call(part: str, tiles, x: dict):
    """The call that times candidate `tiles` of one attention part: the forward, or the whole backward (the
    dQ and dK/dV candidates are timed together with the other kernel at its current config)."""
    if part == "fwd":
        return lambda: attention.attention_forward(x["q"], x["k"], x["v"], scale=x["scale"], tiles=tiles)
    return lambda: attention.attention_backward(
        x["q"], x["k"], x["v"], x["o"], x["stats"], x["do"], scale=x["scale"], tiles=tiles
    )


def layernorm_inputs(shape, dtype, device, seed=0) -> dict:
    """Random x (M, N), a weight not 1 and a bias not 0, and the forward's stats with the table config."""
    m, n = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
    w = (1 + 0.1 * torch.randn(n, device=device, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(n, device=device, generator=gen)).to(dtype)
    y, stats = layernorm.layer_norm_forward(x, w, b, eps=1e-5)
    return dict(x=x, w=w, b=b, y=y, stats=stats)


def head_inputs(shape, dtype, device, seed=0) -> dict:
    """One chunk of logits in `dtype` (scaled as a trained head's) and its targets. The kernel overwrites the
    logits with their gradient, which the next call then reads: the same work on other values."""
    m, vocab = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(m, vocab, device=device, generator=gen) * 3).to(dtype)
    targets = torch.randint(vocab, (m,), device=device, generator=gen)
    return dict(logits=logits, targets=targets, loss=torch.empty(m, device=device))


def head_call(part: str, tiles, x: dict):
    return lambda: head.loss_and_grad_rows(x["logits"], x["targets"], x["loss"], -1, tiles=tiles)


def layernorm_call(part: str, tiles, x: dict):
    if part == "fwd":
        return lambda: layernorm.layer_norm_forward(x["x"], x["w"], x["b"], eps=1e-5, tiles=tiles)
    return lambda: layernorm.layer_norm_backward(
        x["x"], x["w"], x["stats"], x["y"], bias_dtype=x["b"].dtype, tiles=tiles
    )


KERNELS = {  # kernel -> (its module, its inputs, one candidate's call)
    "attention": (attention, attention_inputs, attention_call),
    "layernorm": (layernorm, layernorm_inputs, layernorm_call),
    "residual_layernorm": (residual, residual_inputs, residual_call),
    "bias_gelu": (bias_gelu, gelu_inputs, gelu_call),
    "linear_cross_entropy": (head, head_inputs, head_call),
}
TILES = {
    "attention": attention.AttnTiles,
    "layernorm": layernorm.LNTiles,
    "residual_layernorm": residual.ADLTiles,
    "bias_gelu": bias_gelu.GeluTiles,
    "linear_cross_entropy": head.LCETiles,
}


def warm_one(job) -> str | None:
    """Launch one candidate once on inputs of the timed shapes and layouts (the JIT specialises on how
    shapes and strides divide), so its cubin lands in cuTile's disk cache; the error, if any."""
    kernel, shape, dtype_label, config, part, device = job
    try:
        device = torch.device(device)
        _, make_inputs, call = KERNELS[kernel]
        call(part, TILES[kernel](**config), make_inputs(shape, DTYPES[dtype_label], device))()
        synchronize(device)
        return None
    except Exception as e:  # noqa: BLE001 - reported by the parent; the timed launch records the failure
        return f"{kernel} {part} {config}: {type(e).__name__}: {e}"


def prewarm(jobs: list[tuple], workers: int | None = None) -> list[str]:
    """Compile many candidates in parallel child processes; returns their errors."""
    if not jobs:
        return []
    import multiprocessing as mp

    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 2) - 2, 12))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return [e for e in pool.map(warm_one, jobs) if e]


# ---- the sweeps --------------------------------------------------------------------------------------------


def sweep(rec: Recorder, kernel: str, shape, dtype, candidates: list[tuple[str, dict]], arch: str | None = None):
    """Time every (part, changes) candidate of `kernel` at one shape on rec.device; returns the base config
    (the architecture's table) and the fastest changes per part: {part: (ms, changes)}."""
    module, make_inputs, call = KERNELS[kernel]
    arch = arch or current_arch(rec.device)
    base = module.tiles_for(arch, shape[-1])
    device = str(rec.device)
    warm = [
        (kernel, shape, dtype_name(dtype), asdict(replace(base, **c)), part.split("_")[0], device)
        for part, c in candidates
    ]
    for err in prewarm(warm):
        print("prewarm:", err, file=sys.stderr)
    inputs = make_inputs(shape, dtype, rec.device)
    best: dict[str, tuple[float, dict]] = {}
    for part, changes in candidates:
        tiles = replace(base, **changes)
        r = rec.measure(
            f"tune {kernel}.{part}",
            label(changes),
            shape_label(kernel, shape),
            dtype_name(dtype),
            lambda tiles=tiles, part=part: call(part.split("_")[0], tiles, inputs),
            timing="graph",
            config=asdict(tiles),
        )
        if r["status"] == OK and (part not in best or r["ms"] < best[part][0]):
            best[part] = (r["ms"], changes)
    return base, best


def tune_attention(rec: Recorder, shape=(16, 12, 1024, 64), dtype=torch.bfloat16, arch: str | None = None):
    """Records of every forward / dQ / dK-dV candidate at one shape, and the fastest config (the dQ and
    dK/dV candidates are timed as the whole backward, the other kernel at the current config)."""
    candidates = [("fwd", c) for c in ATTN_FWD] + [("bwd_dq", c) for c in ATTN_DQ] + [("bwd_dkdv", c) for c in ATTN_DKV]
    chosen, best = sweep(rec, "attention", shape, dtype, candidates, arch)
    for part in ("fwd", "bwd_dq", "bwd_dkdv"):
        if part in best:
            chosen = replace(chosen, **best[part][1])
    # dQ and dK/dV share one block order: that of the faster of the two winners.
    backward = [best[p] for p in ("bwd_dq", "bwd_dkdv") if p in best]
    if backward:
        chosen = replace(chosen, bwd_sched=min(backward, key=lambda x: x[0])[1]["bwd_sched"])
    return chosen


def tune_layernorm(rec: Recorder, shape=(16384, 768), dtype=torch.bfloat16, arch: str | None = None):
    """Records of every forward and backward candidate at one shape, and the fastest config."""
    candidates = [("fwd", c) for c in LN_FWD] + [("bwd", c) for c in LN_BWD]
    chosen, best = sweep(rec, "layernorm", shape, dtype, candidates, arch)
    for part in ("fwd", "bwd"):
        if part in best:
            chosen = replace(chosen, **best[part][1])
    return chosen


def tune_residual_layernorm(rec: Recorder, shape=(16384, 384), dtype=torch.bfloat16, arch: str | None = None):
    """Records of every forward and backward candidate of the fused residual LayerNorm, and the fastest config."""
    candidates = [("fwd", c) for c in RESIDUAL_FWD] + [("bwd", c) for c in RESIDUAL_BWD]
    chosen, best = sweep(rec, "residual_layernorm", shape, dtype, candidates, arch)
    for part in ("fwd", "bwd"):
        if part in best:
            chosen = replace(chosen, **best[part][1])
    return chosen


def tune_bias_gelu(rec: Recorder, shape=(16384, 1536), dtype=torch.bfloat16, arch: str | None = None):
    """Records of every candidate of bias + GELU, forward and backward timed apart, and the fastest config: the
    forward's tile and occupancy from the fastest forward, the backward's from the fastest backward."""
    candidates = [("fwd", c) for c in GELU] + [("bwd", c) for c in GELU]
    chosen, best = sweep(rec, "bias_gelu", shape, dtype, candidates, arch)
    for part in ("fwd", "bwd"):
        if part in best:
            chosen = replace(chosen, **{k: v for k, v in best[part][1].items() if k.startswith(part)})
    return chosen


def tune_linear_cross_entropy(rec: Recorder, shape=(2560, 50304), dtype=torch.bfloat16, arch: str | None = None):
    """Records of every candidate of the fused LM head's loss-and-gradient kernel, and the fastest config."""
    chosen, best = sweep(rec, "linear_cross_entropy", shape, dtype, [("grad", c) for c in HEAD], arch)
    return replace(chosen, **best["grad"][1]) if "grad" in best else chosen


def print_ranking(records: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["case"], r["shape"]), []).append(r)
    for (case, shape), rows in groups.items():
        print(f"\n{case} {shape}")
        for r in sorted(rows, key=lambda r: (r["status"] != OK, r.get("ms") or 0)):
            figure = f"{r['ms']:.4f} ms" if r["status"] == OK else f"{r['status']}: {r['reason']}"
            print(f"  {r['implementation']:60s} {figure}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "kernel",
        nargs="?",
        default="all",
        choices=["all", "attention", "layernorm", "residual_layernorm", "bias_gelu", "linear_cross_entropy"],
    )
    ap.add_argument("--json", help="write the records and the chosen configs to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: tuning needs one", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rec = Recorder(device, Timer(device, warmup=3, repeats=15, min_repeat_ms=5.0), log=lambda _: None)
    chosen = {}
    if args.kernel in ("all", "attention"):
        for shape in ATTN_TUNE_SHAPES:
            chosen[f"attention {shape_label('attention', shape)}"] = asdict(tune_attention(rec, shape))
    if args.kernel in ("all", "layernorm"):
        for shape in LN_TUNE_SHAPES:
            chosen[f"layernorm {shape_label('layernorm', shape)}"] = asdict(tune_layernorm(rec, shape))
    if args.kernel in ("all", "residual_layernorm"):
        for shape in RESIDUAL_TUNE_SHAPES:
            chosen[f"residual_layernorm {shape_label('layernorm', shape)}"] = asdict(
                tune_residual_layernorm(rec, shape)
            )
    if args.kernel in ("all", "bias_gelu"):
        for shape in GELU_TUNE_SHAPES:
            chosen[f"bias_gelu {shape_label('layernorm', shape)}"] = asdict(tune_bias_gelu(rec, shape))
    if args.kernel in ("all", "linear_cross_entropy"):
        for shape in HEAD_TUNE_SHAPES:
            chosen[f"linear_cross_entropy {shape_label('layernorm', shape)}"] = asdict(
                tune_linear_cross_entropy(rec, shape)
            )
    print_ranking(rec.records)
    print("\nchosen (for the architecture's table):")
    for key, config in chosen.items():
        print(f"  {key}: {config}")
    if args.json:
        from gptcore.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"records": rec.records, "chosen": chosen}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
