"""Tile sweeps: time every candidate configuration of a kernel (CUDA-graph replay, GPU time only) and hand
back the fastest as an explicit config (an AttnTiles or LNTiles), without touching the kernels' tables.

    python -m gptcore.kernels.tune [attention|layernorm|all] [--json PATH]

prints the ranking of each kernel and the chosen configs, ready to go into the architecture's table in
attention.py / layernorm.py (with the records, as data, in results/).

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

from gptcore.bench.timing import OK, Recorder, Timer
from gptcore.kernels.runtime import current_arch

ATTN_TUNE_SHAPES = ((16, 12, 1024, 64), (8, 12, 2048, 64))  # (B, H, T, D): the table holds the T1024 winners
LN_TUNE_SHAPES = ((16384, 384), (16384, 768))  # (rows, width): the "small" and "large" entries
HEAD_MAJOR, LONGEST_FIRST = 0, 1  # attention.py's block orders

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


def label(changes: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in changes.items())


# ---- compiling every candidate first, in parallel ----------------------------------------------------------


def _attn_inputs(b, h, t, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]


def _warm_one(job) -> str | None:
    """Child process: launch one candidate once, on inputs of the timed shapes and layouts (the JIT
    specialises on how shapes and strides divide), so its cubin lands in cuTile's disk cache."""
    kernel, shape, dtype_name, config, part = job
    try:
        dtype = getattr(torch, dtype_name)
        if kernel == "attention":
            from gptcore.kernels.attention import AttnTiles, attention_backward, attention_forward

            tiles = AttnTiles(**config)
            b, h, t, d = shape
            q, k, v, do = _attn_inputs(b, h, t, d, dtype)
            if part == "fwd":
                attention_forward(q, k, v, 1 / math.sqrt(d), tiles)
            else:
                o = torch.randn(b, t, h, d, device="cuda", dtype=dtype).transpose(1, 2)  # the forward's layout
                stats = torch.randn(2, b, h, t, device="cuda", dtype=torch.float32)
                attention_backward(q, k, v, o, stats, do, 1 / math.sqrt(d), tiles)
        else:
            from gptcore.kernels.layernorm import LNTiles, layer_norm_backward, layer_norm_forward

            tiles = LNTiles(**config)
            m, n = shape
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            w, b = torch.ones(n, device="cuda", dtype=dtype), torch.zeros(n, device="cuda", dtype=dtype)
            y, stats = layer_norm_forward(x, w, b, 1e-5, tiles)
            if part == "bwd":
                layer_norm_backward(x, w, b.dtype, stats, y, tiles)
        torch.cuda.synchronize()
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
        return [e for e in pool.map(_warm_one, jobs) if e]


# ---- the sweeps --------------------------------------------------------------------------------------------


def tune_attention(rec: Recorder, shape=(16, 12, 1024, 64), dtype=torch.bfloat16):
    """Records of every forward / dQ / dK-dV candidate at one shape, and the fastest config (the dQ and
    dK/dV candidates are timed as the whole backward, the other kernel at the current config)."""
    from gptcore.kernels import attention as A

    b, h, t, d = shape
    base = A.tiles_for(current_arch(), d)
    candidates = [("fwd", c) for c in ATTN_FWD] + [("bwd_dq", c) for c in ATTN_DQ] + [("bwd_dkdv", c) for c in ATTN_DKV]
    dtype_name = str(dtype).removeprefix("torch.")
    for err in prewarm(
        [("attention", shape, dtype_name, asdict(replace(base, **c)), part.split("_")[0]) for part, c in candidates]
    ):
        print("prewarm:", err, file=sys.stderr)
    q, k, v, do = _attn_inputs(b, h, t, d, dtype)
    scale = 1 / math.sqrt(d)
    o, stats = A.attention_forward(q, k, v, scale, base)
    best: dict[str, tuple[float, dict]] = {}
    for part, changes in candidates:
        tiles = replace(base, **changes)
        if part == "fwd":

            def run(tiles=tiles):
                A.attention_forward(q, k, v, scale, tiles)
        else:

            def run(tiles=tiles):
                A.attention_backward(q, k, v, o, stats, do, scale, tiles)

        r = rec.measure(
            f"tune attention.{part}",
            label(changes),
            f"B{b}xH{h}xT{t}xD{d}",
            dtype_name,
            lambda run=run: run,
            timing="graph",
            config=asdict(tiles),
        )
        if r["status"] == OK and (part not in best or r["ms"] < best[part][0]):
            best[part] = (r["ms"], changes)
    chosen = base
    for part in ("fwd", "bwd_dq", "bwd_dkdv"):
        if part in best:
            chosen = replace(chosen, **best[part][1])
    # dQ and dK/dV share one block order: that of the faster of the two winners.
    backward = [best[p] for p in ("bwd_dq", "bwd_dkdv") if p in best]
    if backward:
        chosen = replace(chosen, bwd_sched=min(backward, key=lambda x: x[0])[1]["bwd_sched"])
    return chosen


def tune_layernorm(rec: Recorder, shape=(16384, 768), dtype=torch.bfloat16):
    """Records of every forward and backward candidate at one shape, and the fastest config."""
    from gptcore.kernels import layernorm as L

    m, n = shape
    base = L.tiles_for(current_arch(), n)
    candidates = [("fwd", c) for c in LN_FWD] + [("bwd", c) for c in LN_BWD]
    dtype_name = str(dtype).removeprefix("torch.")
    for err in prewarm([("layernorm", shape, dtype_name, asdict(replace(base, **c)), part) for part, c in candidates]):
        print("prewarm:", err, file=sys.stderr)
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(n, device="cuda")).to(dtype)
    b = (0.1 * torch.randn(n, device="cuda")).to(dtype)
    y, stats = L.layer_norm_forward(x, w, b, 1e-5, base)
    best: dict[str, tuple[float, dict]] = {}
    for part, changes in candidates:
        tiles = replace(base, **changes)
        if part == "fwd":

            def run(tiles=tiles):
                L.layer_norm_forward(x, w, b, 1e-5, tiles)
        else:

            def run(tiles=tiles):
                L.layer_norm_backward(x, w, b.dtype, stats, y, tiles)

        r = rec.measure(
            f"tune layernorm.{part}",
            label(changes),
            f"N{m}xC{n}",
            dtype_name,
            lambda run=run: run,
            timing="graph",
            config=asdict(tiles),
        )
        if r["status"] == OK and (part not in best or r["ms"] < best[part][0]):
            best[part] = (r["ms"], changes)
    chosen = base
    for part in ("fwd", "bwd"):
        if part in best:
            chosen = replace(chosen, **best[part][1])
    return chosen


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
    ap.add_argument("kernel", nargs="?", default="all", choices=["all", "attention", "layernorm"])
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
            chosen[f"attention B{shape[0]}xH{shape[1]}xT{shape[2]}xD{shape[3]}"] = asdict(tune_attention(rec, shape))
    if args.kernel in ("all", "layernorm"):
        for shape in LN_TUNE_SHAPES:
            chosen[f"layernorm N{shape[0]}xC{shape[1]}"] = asdict(tune_layernorm(rec, shape))
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
