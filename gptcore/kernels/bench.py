"""Kernel benchmarks (a table, not a test): cuTile attention and LayerNorm against PyTorch.

    python -m gptcore.kernels.bench [--json PATH] [--graphs] [--host] [--tune [attention|layernorm]] [--quick]

Attention (bf16, causal): cuTile vs SDPA's flash and cuDNN backends, forward and forward+backward ms
and TFLOP/s. LayerNorm (bf16): cuTile vs torch, forward and forward+backward ms and GB/s; with
`--graphs` also a "memory floor" reference row: a copy and an add moving the same bytes.
Timing: CUDA events around a batch of eager calls, after a warm-up; the median over repeats. Eager
numbers include the host's launch cost (a Python autograd.Function plus ~6-10 us per ct.launch), which
dominates at small sizes; `--graphs` adds "<impl>+graph" rows timed by CUDA-graph replay (GPU time),
`--host` first breaks the host time of one eager forward+backward down.
`--tune` sweeps the cuTile tile sizes (graph replay), prints the ranking and installs the winners for
the rest of the run; the tables in attention.py / layernorm.py hold the chosen values per architecture.

The functions return lists of dict records (implementation, op, shape, dtype, fwd_ms, fwdbwd_ms,
tflops / gbps) so the pipeline's bench stage can call them and log the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from gptcore.kernels import current_arch

ATTN_SHAPES = ((64, 6, 256, 64), (16, 12, 1024, 64), (8, 12, 2048, 64))  # (B, H, T, D)
LN_SHAPES = ((16384, 384), (16384, 768))  # (rows, width)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_ms(fn, warmup: int = 5, repeats: int = 15, inner: int = 5) -> float:
    """Median milliseconds per call: CUDA events around `inner` back-to-back calls, `repeats` times."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_graph_ms(fn, warmup: int = 3, repeats: int = 15, inner: int = 5) -> float:
    """Like time_ms, but replaying `fn` captured in a CUDA graph: GPU time without host launch cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # every kernel launched (and compiled) once before capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup=2, repeats=repeats, inner=inner)


def attention_flops(b: int, h: int, t: int, d: int, backward: bool = False) -> float:
    """Causal attention: two T x T x D products forward, half of them masked; backward is 2.5x."""
    fwd = 4.0 * b * h * t * t * d / 2
    return fwd * 3.5 if backward else fwd


def layernorm_bytes(m: int, n: int, elt: int, backward: bool = False) -> float:
    """Fewest bytes: x in, y out (+ fp32 mean/rstd); backward reads x, dy and writes dx."""
    fwd = 2 * m * n * elt + 8 * m
    return fwd + 3 * m * n * elt + 8 * m if backward else fwd


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def attention_impls() -> dict:
    from torch.nn.attention import SDPBackend

    from gptcore.kernels.attention import causal_attention
    return {
        "cutile": causal_attention,
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def _time_impls(table: dict, names: list[str], graphs: bool, base: dict, forward, forward_backward,
                work: tuple[float, float], unit: str, timer_kw: dict | None = None) -> list[dict]:
    """One record per implementation (and per "<name>+graph" replay when `graphs`): forward ms under
    no_grad and forward+backward ms, each with its rate: `work` (FLOP or bytes of forward, forward+backward)
    per second in `unit` ("tflops" or "gbps"). `forward(fn)` / `forward_backward(fn)` make one call."""
    scale = {"tflops": 1e9, "gbps": 1e6}[unit]  # work / ms / scale
    timer_kw = timer_kw or {}
    records = []
    runs = [(n, time_ms) for n in names] + ([(n, time_graph_ms) for n in names] if graphs else [])
    for name, timer in runs:
        fn = table[name]
        rec = {"implementation": name + ("+graph" if timer is time_graph_ms else ""), **base,
               "fwd_ms": None, "fwdbwd_ms": None, f"fwd_{unit}": None, f"fwdbwd_{unit}": None, "error": None}
        try:
            with torch.no_grad():
                fwd = timer(lambda: forward(fn), **timer_kw)
            rec["fwd_ms"] = round(fwd, 4)
            rec[f"fwd_{unit}"] = round(work[0] / fwd / scale, 1)
            if forward_backward is not None:
                fb = timer(lambda: forward_backward(fn), **timer_kw)
                rec["fwdbwd_ms"] = round(fb, 4)
                rec[f"fwdbwd_{unit}"] = round(work[1] / fb / scale, 1)
        except Exception as e:  # noqa: BLE001 - a backend missing on this build is a row, not a crash
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        records.append(rec)
    return records


def bench_attention(shapes=ATTN_SHAPES, dtype=torch.bfloat16, impls: list[str] | None = None,
                    backward: bool = True, graphs: bool = False) -> list[dict]:
    """One record per (implementation, shape): fwd_ms, fwdbwd_ms and TFLOP/s of each.
    With graphs=True, each implementation also gets a "<name>+graph" row timed by CUDA-graph replay."""
    table = attention_impls()
    records = []
    for b, h, t, d in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
        do = torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=gen)
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        base = {"op": "causal_attention", "shape": f"B{b},H{h},T{t},D{d}", "dtype": str(dtype).removeprefix("torch.")}
        records += _time_impls(
            table, impls or list(table), graphs, base, lambda fn: fn(q, k, v),
            (lambda fn: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)) if backward else None,
            (attention_flops(b, h, t, d), attention_flops(b, h, t, d, True)), "tflops")
    return records


# --------------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------------
def layernorm_impls() -> dict:
    from gptcore.kernels.layernorm import layer_norm
    return {
        "cutile": lambda x, w, b: layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
    }


def bench_layernorm(shapes=LN_SHAPES, dtype=torch.bfloat16, impls: list[str] | None = None,
                    graphs: bool = False) -> list[dict]:
    """One record per (implementation, shape): fwd_ms, fwdbwd_ms and GB/s (fewest bytes / time).
    With graphs=True, each implementation also gets a "<name>+graph" row timed by CUDA-graph replay."""
    table = layernorm_impls()
    records = []
    elt = torch.finfo(dtype).bits // 8
    for m, n in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
        w = (1 + 0.1 * torch.randn(n, device="cuda", generator=gen)).to(dtype)
        b = (0.1 * torch.randn(n, device="cuda", generator=gen)).to(dtype)
        dy = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
        xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        base = {"op": "layer_norm", "shape": f"{m}x{n}", "dtype": str(dtype).removeprefix("torch.")}
        records += _time_impls(
            table, impls or list(table), graphs, base, lambda fn: fn(x, w, b),
            lambda fn: torch.autograd.grad(fn(xg, wg, bg), (xg, wg, bg), dy),
            (layernorm_bytes(m, n, elt), layernorm_bytes(m, n, elt, True)), "gbps", {"repeats": 25, "inner": 10})
        if graphs:
            records.append(memory_floor(base, x, dy, (layernorm_bytes(m, n, elt), layernorm_bytes(m, n, elt, True))))
    return records


def memory_floor(base: dict, x: torch.Tensor, dy: torch.Tensor, work: tuple[float, float]) -> dict:
    """A reference row, not a LayerNorm: the GPU time (graph replay) of moving the forward's bytes (a copy:
    read x, write y) and then the backward's (an add: read x and dy, write dx), what the memory system
    alone allows on this card."""
    y, dx = torch.empty_like(x), torch.empty_like(x)
    fwd = time_graph_ms(lambda: y.copy_(x), repeats=25, inner=10)
    bwd = time_graph_ms(lambda: torch.add(x, dy, out=dx), repeats=25, inner=10)
    return {"implementation": "memory floor", **base, "fwd_ms": round(fwd, 4), "fwdbwd_ms": round(fwd + bwd, 4),
            "fwd_gbps": round(work[0] / fwd / 1e6, 1), "fwdbwd_gbps": round(work[1] / (fwd + bwd) / 1e6, 1),
            "error": None, "note": "copy x -> y, then x + dy -> dx: the bytes alone, graph replay"}


# --------------------------------------------------------------------------------------------------
# Tile sweeps (tuning). Compiling every variant serially would take minutes, so the JIT's disk cache
# is filled first by a pool of processes, each launching a few variants once.
# --------------------------------------------------------------------------------------------------
# (TILE_M, TILE_N, occupancy, block order); 0 = HEAD_MAJOR, 1 = LONGEST_FIRST (attention.py)
FWD_SWEEP = ((128, 64, 2, 0), (128, 64, 2, 1), (64, 128, 2, 0), (64, 128, 2, 1), (128, 128, 1, 0),
             (128, 128, 2, 0), (64, 64, 2, 0), (64, 64, 4, 0), (128, 64, 1, 0), (64, 128, 3, 0),
             (128, 32, 2, 0), (64, 64, 4, 1), (64, 64, 3, 0), (64, 32, 4, 0))
DQ_SWEEP = ((128, 64, 2, 0), (128, 64, 2, 1), (64, 64, 2, 0), (64, 64, 2, 1), (64, 128, 2, 0),
            (128, 64, 1, 0), (128, 128, 1, 0), (64, 64, 4, 0), (128, 32, 2, 0))
# (TILE_M inner query rows, TILE_N owned key rows, occupancy, block order)
DKV_SWEEP = ((128, 64, 2, 0), (128, 64, 2, 1), (64, 64, 2, 0), (64, 64, 2, 1), (64, 128, 2, 0),
             (32, 128, 2, 0), (128, 64, 1, 0), (128, 128, 1, 0), (64, 64, 4, 0), (32, 64, 4, 0))
# (rows, occupancy, worker warps (None: the compiler's choice, 4), blocks/SM (0: one per row tile), latency)
LN_FWD_SWEEP = ((16, 4, None, 0, 0), (8, 4, None, 0, 0), (32, 2, None, 0, 0), (16, 4, None, 4, 3),
                (16, 4, None, 4, 6), (8, 4, None, 4, 3), (8, 4, None, 4, 4), (8, 4, None, 4, 6), (16, 2, None, 2, 4),
                (16, 2, 8, 2, 4), (16, 2, 8, 2, 6), (32, 2, 8, 2, 4), (32, 1, 8, 1, 6), (16, 1, 8, 1, 4))
# (rows, occupancy, blocks/SM, load latency hint (0: none), deferred column sums, worker warps)
LN_BWD_SWEEP = ((32, 1, 1, 4, True, 8), (32, 1, 1, 2, True, 8), (16, 1, 1, 4, True, 8), (16, 2, 2, 4, True, None),
                (8, 2, 2, 4, True, None), (16, 2, 2, 4, False, None), (8, 2, 2, 4, False, None),
                (8, 2, 2, 6, False, None), (4, 2, 2, 4, False, None), (4, 4, 4, 4, False, None),
                (16, 1, 1, 4, False, 8), (8, 1, 1, 4, False, 8), (16, 2, 8, 0, False, None))
ATTN_TUNE_SHAPES = ((16, 12, 1024, 64), (8, 12, 2048, 64))  # the tables hold the T = 1024 winners


def _attn_variants(base):
    out = []
    for m, n, occ, sched in FWD_SWEEP:
        out.append(("fwd", replace(base, fwd_m=m, fwd_n=n, fwd_occ=occ, fwd_sched=sched, fwd_sched_long=sched)))
    for m, n, occ, sched in DQ_SWEEP:
        out.append(("dq", replace(base, dq_m=m, dq_n=n, dq_occ=occ, bwd_sched=sched)))
    for m, n, occ, sched in DKV_SWEEP:
        out.append(("dkv", replace(base, dkv_m=m, dkv_n=n, dkv_occ=occ, bwd_sched=sched)))
    return out


def _ln_variants(base):
    out = []
    for rows, occ, warps, per_sm, latency in LN_FWD_SWEEP:
        out.append(("fwd", replace(base, fwd_rows=rows, fwd_occ=occ, fwd_warps=warps, fwd_blocks_per_sm=per_sm,
                                   fwd_latency=latency)))
    for rows, occ, per_sm, latency, defer, warps in LN_BWD_SWEEP:
        out.append(("bwd", replace(base, bwd_rows=rows, bwd_occ=occ, bwd_blocks_per_sm=per_sm,
                                   bwd_latency=latency, bwd_defer=defer, bwd_warps=warps)))
    return out


def _attn_inputs(b, h, t, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]


def _warm_one(job):
    """Child process: launch one variant once so its cubin lands in cuTile's disk cache.

    The inputs have the shapes and layouts of the timed ones (the JIT specialises on 16-divisibility
    of shapes and strides), so the parent's launches then hit the cache instead of compiling.
    """
    kind, shape, dtype_name, tiles_dict, part = job
    try:
        dtype = getattr(torch, dtype_name)
        if kind == "attn":
            from gptcore.kernels.attention import AttnTiles, attention_backward, attention_forward
            tiles = AttnTiles(**tiles_dict)
            b, h, t, d = shape
            q, k, v, do = _attn_inputs(*shape, dtype)
            if part in ("fwd", "all"):
                attention_forward(q, k, v, 1 / math.sqrt(d), tiles)
            if part in ("bwd", "all"):
                o = torch.randn(b, t, h, d, device="cuda", dtype=dtype).transpose(1, 2)  # forward's layout
                stats = torch.randn(2, b, h, t, device="cuda", dtype=torch.float32)
                attention_backward(q, k, v, o, stats, do, 1 / math.sqrt(d), tiles)
        else:
            from gptcore.kernels.layernorm import LNTiles, layer_norm_backward, layer_norm_forward
            tiles = LNTiles(**tiles_dict)
            m, n = shape
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            w, b = torch.ones(n, device="cuda", dtype=dtype), torch.zeros(n, device="cuda", dtype=dtype)
            y, stats = layer_norm_forward(x, w, b, 1e-5, tiles)
            if part in ("bwd", "all"):
                layer_norm_backward(x, w, b.dtype, stats, y, tiles)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{job}: {type(e).__name__}: {e}"


def prewarm(jobs, workers: int | None = None) -> list[str]:
    """Compile many variants in parallel child processes (each fills cuTile's disk cache)."""
    if not jobs:
        return []
    workers = workers or max(1, min(len(jobs), (os.cpu_count() or 2) - 2, 12))
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return [e for e in pool.map(_warm_one, jobs) if e]


def prewarm_defaults(attn_shapes=ATTN_SHAPES, ln_shapes=LN_SHAPES, dtype=torch.bfloat16) -> list[str]:
    """Compile the default tile configs for the benchmark shapes in parallel (fills the disk cache)."""
    from gptcore.kernels import attention as A
    from gptcore.kernels import layernorm as L
    name = str(dtype).removeprefix("torch.")
    jobs = [("attn", s, name, asdict(A.tiles_for(current_arch(), s[3])), "all") for s in attn_shapes]
    jobs += [("ln", s, name, asdict(L.tiles_for(current_arch(), s[1])), "all") for s in ln_shapes]
    return prewarm(jobs)


def tune_attention(shape=(16, 12, 1024, 64), dtype=torch.bfloat16) -> list[dict]:
    """Time every forward / dQ / dK-dV tile variant at one shape (CUDA-graph replay: GPU time only).

    The dQ and dK/dV variants are timed as the whole backward (both kernels), the other kernel at
    its current default, so their differences are the varied kernel's."""
    from gptcore.kernels import attention as A
    b, h, t, d = shape
    base = A.tiles_for(current_arch(), d)
    variants = _attn_variants(base)
    name = str(dtype).removeprefix("torch.")
    errs = prewarm([("attn", shape, name, asdict(v), "fwd" if part == "fwd" else "bwd") for part, v in variants])
    for e in errs:
        print("prewarm:", e, file=sys.stderr)
    q, k, v, do = _attn_inputs(b, h, t, d, dtype)
    scale = 1 / math.sqrt(d)
    o, stats = A.attention_forward(q, k, v, scale, base)
    records = []
    for part, tiles in variants:
        rec = {"op": "attention_" + part, "shape": f"B{b},H{h},T{t},D{d}", "tiles": asdict(tiles)}
        if part == "fwd":
            rec["label"] = f"M{tiles.fwd_m} N{tiles.fwd_n} occ{tiles.fwd_occ} sched{tiles.fwd_sched}"
        elif part == "dq":
            rec["label"] = f"M{tiles.dq_m} N{tiles.dq_n} occ{tiles.dq_occ} sched{tiles.bwd_sched}"
        else:
            rec["label"] = f"M{tiles.dkv_m} N{tiles.dkv_n} occ{tiles.dkv_occ} sched{tiles.bwd_sched}"
        if part == "fwd":
            records.append(_timed_variant(rec, lambda: A.attention_forward(q, k, v, scale, tiles)))
        else:
            records.append(_timed_variant(rec, lambda: A.attention_backward(q, k, v, o, stats, do, scale, tiles)))
    return records


def _timed_variant(rec: dict, fn, **timer_kw) -> dict:
    """`rec` with the CUDA-graph replay time of `fn` ("ms"), or None and the error when it fails."""
    try:
        rec["ms"] = round(time_graph_ms(fn, **timer_kw), 4)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is a row, not a crash
        rec["ms"] = None
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return rec


def _fastest(records, prefix: str, shape: str | None = None) -> dict:
    """The fastest record of each part ("fwd", "dq", ...) among `records` whose op starts with `prefix`."""
    best = {}
    for r in records:
        if r.get("ms") is None or (shape is not None and r["shape"] != shape):
            continue
        part = r["op"].removeprefix(prefix)
        if part not in best or r["ms"] < best[part]["ms"]:
            best[part] = r
    return best


def best_attention_tiles(records, base, shape: str | None = None):
    """The fastest forward, dQ and dK/dV variants (at `shape`, or over all records) combined (dQ and
    dK/dV share one block order: the order of the faster of the two winners' backward totals)."""
    best = _fastest(records, "attention_", shape)
    t = base
    if "fwd" in best:
        f = best["fwd"]["tiles"]
        t = replace(t, fwd_m=f["fwd_m"], fwd_n=f["fwd_n"], fwd_occ=f["fwd_occ"], fwd_sched=f["fwd_sched"],
                    fwd_sched_long=f["fwd_sched"])
    if "dq" in best:
        f = best["dq"]["tiles"]
        t = replace(t, dq_m=f["dq_m"], dq_n=f["dq_n"], dq_occ=f["dq_occ"])
    if "dkv" in best:
        f = best["dkv"]["tiles"]
        t = replace(t, dkv_m=f["dkv_m"], dkv_n=f["dkv_n"], dkv_occ=f["dkv_occ"])
    bwd = [best[p] for p in ("dq", "dkv") if p in best]
    if bwd:
        t = replace(t, bwd_sched=min(bwd, key=lambda r: r["ms"])["tiles"]["bwd_sched"])
    return t


def tune_layernorm(shapes=LN_SHAPES, dtype=torch.bfloat16) -> list[dict]:
    """Time every LayerNorm forward / backward variant (CUDA-graph replay: GPU time only)."""
    from gptcore.kernels import layernorm as L
    jobs, plan = [], []
    for m, n in shapes:
        base = L.tiles_for(current_arch(), n)
        for part, tiles in _ln_variants(base):
            plan.append(((m, n), part, tiles))
            jobs.append(("ln", (m, n), str(dtype).removeprefix("torch."), asdict(tiles), part))
    for e in prewarm(jobs):
        print("prewarm:", e, file=sys.stderr)
    records = []
    cache = {}
    for (m, n), part, tiles in plan:
        if (m, n) not in cache:
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            w = (1 + 0.1 * torch.randn(n, device="cuda")).to(dtype)
            b = (0.1 * torch.randn(n, device="cuda")).to(dtype)
            y, stats = L.layer_norm_forward(x, w, b, 1e-5)
            cache[(m, n)] = (x, w, b, y, stats)
        x, w, b, dy, stats = cache[(m, n)]
        rec = {"op": "layernorm_" + part, "shape": f"{m}x{n}", "tiles": asdict(tiles)}
        if part == "fwd":
            rec["label"] = (f"rows{tiles.fwd_rows} occ{tiles.fwd_occ} warps{tiles.fwd_warps or 'auto'} "
                            f"blocks/SM{tiles.fwd_blocks_per_sm or 'all'} latency{tiles.fwd_latency}")
        else:
            rec["label"] = (f"rows{tiles.bwd_rows} occ{tiles.bwd_occ} blocks/SM{tiles.bwd_blocks_per_sm} "
                            f"latency{tiles.bwd_latency} warps{tiles.bwd_warps or 'auto'}"
                            + (" deferred" if tiles.bwd_defer else ""))
        if part == "fwd":
            records.append(_timed_variant(rec, lambda: L.layer_norm_forward(x, w, b, 1e-5, tiles),
                                          repeats=25, inner=10))
        else:
            records.append(_timed_variant(rec, lambda: L.layer_norm_backward(x, w, b.dtype, stats, dy, tiles),
                                          repeats=25, inner=10))
    return records


def best_layernorm_tiles(records, base, shape: str):
    best = _fastest(records, "layernorm_", shape)
    t = base
    if "fwd" in best:
        f = best["fwd"]["tiles"]
        t = replace(t, fwd_rows=f["fwd_rows"], fwd_occ=f["fwd_occ"], fwd_warps=f["fwd_warps"],
                    fwd_blocks_per_sm=f["fwd_blocks_per_sm"], fwd_latency=f["fwd_latency"])
    if "bwd" in best:
        f = best["bwd"]["tiles"]
        t = replace(t, bwd_rows=f["bwd_rows"], bwd_occ=f["bwd_occ"], bwd_blocks_per_sm=f["bwd_blocks_per_sm"],
                    bwd_latency=f["bwd_latency"], bwd_defer=f["bwd_defer"], bwd_warps=f["bwd_warps"])
    return t


def apply_tuning(attn_records, ln_records) -> dict:
    """Install the sweep's winners for this GPU's arch in-process (what the tables should then say)."""
    from gptcore.kernels import attention as A
    from gptcore.kernels import layernorm as L
    arch = current_arch()
    chosen = {}
    if attn_records:
        shapes = [f"B{b},H{h},T{t_},D{d}" for b, h, t_, d in ATTN_TUNE_SHAPES]
        t = best_attention_tiles(attn_records, A.tiles_for(arch, 64), shapes[0])
        # Long sequences keep the winner's tile sizes and take the block order that was faster with them
        # at the longest tuned shape.
        same_tiles = [r for r in attn_records if r["op"] == "attention_fwd" and r["shape"] == shapes[-1]
                      and all(r["tiles"][k] == getattr(t, k) for k in ("fwd_m", "fwd_n", "fwd_occ"))]
        long_fwd = _fastest(same_tiles, "attention_").get("fwd")
        if long_fwd:
            t = replace(t, fwd_sched_long=long_fwd["tiles"]["fwd_sched"])
        A.ATTN_TILES[arch] = t
        chosen["attention"] = asdict(t)
    if ln_records:
        table = dict(L.LN_TILES.get(arch, L.LN_TILES["default"]))
        for key, (m, n) in (("small", LN_SHAPES[0]), ("large", LN_SHAPES[1])):
            table[key] = best_layernorm_tiles(ln_records, L.tiles_for(arch, n), f"{m}x{n}")
            chosen[f"layernorm_{key}"] = asdict(table[key])
        L.LN_TILES[arch] = table
        L._plan.cache_clear()  # launch plans cached under the old table
    return chosen


# --------------------------------------------------------------------------------------------------
# Host overhead: per-call host time of the eager paths at tiny sizes (GPU time negligible)
# --------------------------------------------------------------------------------------------------
def host_overhead_us(fn, calls: int = 200) -> float:
    import time
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


class _Identity(torch.autograd.Function):
    """Baseline: the cost of any Python autograd.Function here (one torch op each way)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * 1.0


def _in_thread_us(fn, calls: int = 200) -> float:
    import threading
    out = []
    th = threading.Thread(target=lambda: out.append(host_overhead_us(fn, calls)))
    th.start()
    th.join()
    return out[0]


def host_overhead() -> list[dict]:
    """Where the host time of an eager forward+backward goes, at tiny sizes (GPU time negligible).

    Rows: the whole fwd+bwd through autograd; inside our Python backward (and inside ct.launch alone);
    the same launches called directly from the main thread and from another Python thread; autograd
    with multithreading disabled (backward on the calling thread); a torch-only autograd.Function
    baseline; and the torch references."""
    import time

    import cuda.tile as ct

    from gptcore.kernels import attention as A
    from gptcore.kernels import layernorm as L
    dt = torch.bfloat16
    q, k, v, do = (torch.randn(1, 1, 64, 64, device="cuda", dtype=dt) for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    x = torch.randn(64, 384, device="cuda", dtype=dt)
    w, b = torch.ones(384, device="cuda", dtype=dt), torch.zeros(384, device="cuda", dtype=dt)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    dy = torch.randn_like(x)
    o, attn_stats = A.attention_forward(q, k, v, 0.125)
    y, ln_stats = L.layer_norm_forward(x, w, b, 1e-5)

    def attn_fb():
        torch.autograd.grad(A.causal_attention(qg, kg, vg), (qg, kg, vg), do)

    def ln_fb():
        torch.autograd.grad(L.layer_norm(xg, wg, bg), (xg, wg, bg), dy)

    def ident_fb():
        torch.autograd.grad(_Identity.apply(xg), (xg,), dy)

    def attn_direct():
        A.attention_forward(q, k, v, 0.125)
        A.attention_backward(q, k, v, o, attn_stats, do, 0.125)

    def ln_direct():
        L.layer_norm_forward(x, w, b, 1e-5)
        L.layer_norm_backward(x, w, b.dtype, ln_stats, dy)

    def no_mt(fn):
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    records = []

    def add(case, us, note=""):
        records.append({"case": case, "host_us": round(us, 1), "note": note})

    # Inside-backward and inside-launch timers (patched in, removed afterwards).
    acc = {"bwd": 0.0, "launch": 0.0}
    real_launch = ct.launch
    real_bwd = {F_: F_.backward for F_ in (A.CausalAttentionFunction, L.LayerNormFunction)}

    def timed_launch(*args, **kw):
        t0 = time.perf_counter()
        try:
            return real_launch(*args, **kw)
        finally:
            acc["launch"] += time.perf_counter() - t0

    def timed_bwd(orig):
        def run(ctx, *grads):
            t0 = time.perf_counter()
            try:
                return orig(ctx, *grads)
            finally:
                acc["bwd"] += time.perf_counter() - t0
        return staticmethod(run)

    calls = 200
    for name, fn in (("attention", attn_fb), ("layer_norm", ln_fb)):
        add(f"cutile {name} fwd+bwd (autograd)", host_overhead_us(fn, calls))
        ct.launch = timed_launch
        for F_, orig in real_bwd.items():
            F_.backward = timed_bwd(orig)
        acc.update(bwd=0.0, launch=0.0)
        try:
            host_overhead_us(fn, calls)  # 10 warm-up calls + `calls` timed ones
        finally:
            ct.launch = real_launch
            for F_, orig in real_bwd.items():
                F_.backward = staticmethod(orig)
        n = calls + 10
        add("  inside our backward (Python)", acc["bwd"] / n * 1e6, "of the row above")
        add("  inside ct.launch (fwd+bwd launches)", acc["launch"] / n * 1e6, "of the row above")
        add(f"cutile {name} fwd+bwd, multithreading off", host_overhead_us(no_mt(fn), calls),
            "torch.autograd.set_multithreading_enabled(False)")
    add("cutile attention fwd+bwd launches, direct, main thread", host_overhead_us(attn_direct, calls))
    add("cutile attention fwd+bwd launches, direct, other thread", _in_thread_us(attn_direct, calls))
    add("cutile layer_norm fwd+bwd launches, direct, main thread", host_overhead_us(ln_direct, calls))
    add("cutile layer_norm fwd+bwd launches, direct, other thread", _in_thread_us(ln_direct, calls))
    add("torch-only autograd.Function fwd+bwd (baseline)", host_overhead_us(ident_fb, calls))
    add("torch-only autograd.Function, multithreading off", host_overhead_us(no_mt(ident_fb), calls))
    add("torch sdpa fwd+bwd", host_overhead_us(lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), do), calls))
    add("torch layer_norm fwd+bwd", host_overhead_us(
        lambda: torch.autograd.grad(F.layer_norm(xg, (384,), wg, bg), (xg, wg, bg), dy), calls))
    return records


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------
def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def print_attention(records) -> None:
    print(f"\n{'attention (causal)':22s} {'impl':11s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} "
          f"{'TFLOP/s':>8s}")
    for r in records:
        print(f"{r['shape']:22s} {r['implementation']:11s} {_fmt(r['fwd_ms']):>8s} "
              f"{_fmt(r['fwd_tflops'], '.0f'):>8s} {_fmt(r['fwdbwd_ms']):>11s} "
              f"{_fmt(r['fwdbwd_tflops'], '.0f'):>8s}  {r['error'] or ''}")


def print_layernorm(records) -> None:
    print(f"\n{'layer_norm':22s} {'impl':11s} {'fwd ms':>8s} {'GB/s':>8s} {'fwd+bwd ms':>11s} {'GB/s':>8s}")
    for r in records:
        print(f"{r['shape']:22s} {r['implementation']:11s} {_fmt(r['fwd_ms'], '.4f'):>8s} "
              f"{_fmt(r['fwd_gbps'], '.0f'):>8s} {_fmt(r['fwdbwd_ms'], '.4f'):>11s} "
              f"{_fmt(r['fwdbwd_gbps'], '.0f'):>8s}  {r['error'] or ''}")


def print_tuning(records) -> None:
    by_op: dict[str, list] = {}
    for r in records:
        by_op.setdefault(f"{r['op']} {r['shape']}", []).append(r)
    for key, rows in by_op.items():
        print(f"\n{key}")
        for r in sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0)):
            print(f"  {r['label'] if 'label' in r else r['tiles']:40s} {_fmt(r['ms'], '.4f'):>9s} ms  "
                  f"{r.get('error', '')}")


def print_host(records) -> None:
    print(f"\n{'host time per call, tiny shapes':58s} {'us':>8s}")
    for r in records:
        print(f"{r['case']:58s} {r['host_us']:8.1f}  {r['note']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cuTile kernel benchmarks (bf16) against PyTorch")
    ap.add_argument("--json", default=None, help="write all records to this file")
    ap.add_argument("--tune", nargs="?", const="all", choices=["all", "attention", "layernorm"], default=None,
                    help="sweep the tile sizes first (all kernels, or one) and print the ranking")
    ap.add_argument("--no-bench", action="store_true", help="only the sweep (with --tune)")
    ap.add_argument("--quick", action="store_true", help="one attention shape and one LayerNorm shape")
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph replays (GPU time only)")
    ap.add_argument("--host", action="store_true", help="first measure host time per call at tiny sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: the cuTile kernel benchmark needs one", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.host:
        for e in prewarm_defaults([(1, 1, 64, 64)], [(64, 384)]):
            print("prewarm:", e, file=sys.stderr)
        out["host"] = host_overhead()
        print_host(out["host"])
    if args.tune:
        out["tune_attention"] = ([r for shape in ATTN_TUNE_SHAPES for r in tune_attention(shape)]
                                 if args.tune in ("all", "attention") else [])
        print_tuning(out["tune_attention"])
        out["tune_layernorm"] = tune_layernorm() if args.tune in ("all", "layernorm") else []
        print_tuning(out["tune_layernorm"])
        out["chosen_tiles"] = apply_tuning(out["tune_attention"], out["tune_layernorm"])
        print("\nchosen (installed for this run):", json.dumps(out["chosen_tiles"]))
    if not args.no_bench:
        attn_shapes = ATTN_SHAPES[1:2] if args.quick else ATTN_SHAPES
        ln_shapes = LN_SHAPES[:1] if args.quick else LN_SHAPES
        for e in prewarm_defaults(attn_shapes, ln_shapes):
            print("prewarm:", e, file=sys.stderr)
        out["attention"] = bench_attention(attn_shapes, graphs=args.graphs)
        out["layernorm"] = bench_layernorm(ln_shapes, graphs=args.graphs)
        print_attention(out["attention"])
        print_layernorm(out["layernorm"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
