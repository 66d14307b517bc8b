"""Kernel benchmarks: cuTile attention and LayerNorm against PyTorch, as rows of the one record schema
(gptcore.bench.timing). The bench stage takes them at the model's shapes; on its own,

    python -m gptcore.bench.kernels [--graphs] [--host] [--quick] [--json PATH]

prints the kernel tables on a GPU: forward and forward+backward per implementation, eager (host launch
cost included) and, with --graphs, replayed as CUDA graphs (GPU time only) beside a memory-floor row for
LayerNorm (a copy and an add moving the same bytes), and attention forward+backward with dropout (--dropout,
0.2 by default). --host adds the host time of one eager call, forward and forward+backward, at tiny sizes,
where it is all there is: the eager path, the custom operators and PyTorch's. Tile sweeps are gptcore.bench.tune.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.nn.functional as F

from gptcore.bench.timing import OK, Recorder, Skip, Timer, add_speedups, record_id
from gptcore.devices import dtype_name
from gptcore.kernels.runtime import attention_dtype_unsupported, cutile_unavailable
from gptcore.model import GPTConfig

ATTN_SHAPES = ((64, 6, 256, 64), (16, 12, 1024, 64), (8, 12, 2048, 64))  # (B, H, T, D)
LN_SHAPES = ((16384, 384), (16384, 768))  # (rows, width)
GPT2_SMALL = dict(n_head=12, block_size=1024, n_embd=768)
SDPA_BACKENDS = {  # implementation name -> torch.nn.attention.SDPBackend member name
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
# The implementation each speedup is relative to, per case (the first one measured in the list).
REFERENCE = {
    "attention_fwd": ["sdpa-flash", "sdpa-math"],
    "attention_fwd_bwd": ["sdpa-flash", "sdpa-math"],
    "layernorm_fwd": ["torch"],
    "layernorm_fwd_bwd": ["torch"],
    "attention_dropout_fwd_bwd": ["sdpa-flash", "sdpa-math"],
    "attention_host": ["sdpa-flash", "sdpa-math"],
    "attention_host_fwd": ["sdpa-flash", "sdpa-math"],
    "layernorm_host": ["torch"],
    "layernorm_host_fwd": ["torch"],
}


def attention_flops(b: int, h: int, t: int, d: int, backward: bool = False) -> float:
    """Causal attention: two T x T x D products forward, half of them masked; the backward is 2.5x."""
    fwd = 4.0 * b * h * t * t * d / 2
    return fwd * 3.5 if backward else fwd


def layernorm_bytes(m: int, n: int, elt: int, backward: bool = False) -> float:
    """Fewest bytes: x in, y out (+ fp32 mean and rstd); the backward reads x and dy and writes dx."""
    fwd = 2 * m * n * elt + 8 * m
    return fwd + 3 * m * n * elt + 8 * m if backward else fwd


# ---- attention ---------------------------------------------------------------------------------------------


def tflops(flops: float):
    """The figures of a row doing `flops` floating-point operations per call, from its milliseconds."""
    return lambda ms: {"tflops": flops / ms / 1e9}


def gbps(nbytes: float):
    """The figures of a row moving `nbytes` bytes per call, from its milliseconds."""
    return lambda ms: {"gbps": nbytes / ms / 1e6}


def host_us(ms: float) -> dict:
    """The figures of a host-time row: microseconds per call."""
    return {"host_us": ms * 1000}


def _sdpa_params(q, k, v, dropout_p: float):
    from torch.backends.cuda import SDPAParams

    try:
        return SDPAParams(q, k, v, None, dropout_p, True, False)  # enable_gqa since torch 2.5
    except TypeError:  # pragma: no cover - older torch
        return SDPAParams(q, k, v, None, dropout_p, True)


def sdpa_attention(backend: str, device: torch.device, q, k, v, dropout_p: float = 0.0):
    """F.scaled_dot_product_attention pinned to one backend, or Skip with the reason it cannot take these
    inputs (asked of torch's own availability checks, before any call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
    if member is None:
        raise Skip(f"this torch ({torch.__version__}) has no SDPA backend {SDPA_BACKENDS[backend]}")
    if device.type != "cuda" and backend in ("sdpa-cudnn", "sdpa-efficient"):
        raise Skip(f"SDPA's {backend.removeprefix('sdpa-')} backend runs on CUDA only, not on {device.type}")
    if device.type == "cuda" and backend != "sdpa-math":
        from torch.backends import cuda as backends

        check = {
            "sdpa-flash": backends.can_use_flash_attention,
            "sdpa-cudnn": backends.can_use_cudnn_attention,
            "sdpa-efficient": backends.can_use_efficient_attention,
        }[backend]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = check(_sdpa_params(q, k, v, dropout_p), True)  # debug=True: torch warns why not
        if not usable:
            why = "; ".join(str(w.message).splitlines()[0] for w in caught) or "torch's availability check said no"
            raise Skip(f"SDPA backend not available for these inputs: {why}")

    def attend(q, k, v):
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)

    return attend


def cutile_attention(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0):
    reason = cutile_unavailable(device) or attention_dtype_unsupported(dtype)
    if reason:
        raise Skip(reason)
    from gptcore import kernels

    return lambda q, k, v: kernels.causal_attention(q, k, v, dropout_p=dropout_p)


def attention_rows(
    rec: Recorder,
    shapes: str,
    b: int,
    h: int,
    t: int,
    d: int,
    dtype: torch.dtype,
    timings: tuple[str, ...] = ("eager",),
    dropout_p: float = 0.0,
) -> None:
    """Causal attention (B, H, T, D) forward and forward+backward, cuTile and every SDPA backend; with
    dropout_p > 0 also forward+backward with attention dropout (`attention_dropout_fwd_bwd`)."""
    device = rec.device
    shape = f"B{b}xH{h}xT{t}xD{d}"
    flops_fwd, flops_fwd_bwd = attention_flops(b, h, t, d), attention_flops(b, h, t, d, backward=True)

    def inputs(grad: bool):
        g = torch.Generator(device=device).manual_seed(0)
        return [torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]

    def attend_for(impl: str, q, k, v, p: float = 0.0):
        if impl == "cutile":
            return cutile_attention(device, dtype, p)
        return sdpa_attention(impl, device, q, k, v, p)

    for timing in timings:
        for impl in ["cutile", *SDPA_BACKENDS]:

            def setup_fwd(impl=impl):
                q, k, v = inputs(False)
                attend = attend_for(impl, q, k, v)

                def run():
                    with torch.no_grad():
                        attend(q, k, v)

                return run

            def setup_fwd_bwd(impl=impl, p=0.0):
                q, k, v = inputs(True)
                attend = attend_for(impl, q, k, v, p)
                dout = torch.randn_like(q)

                def run():
                    torch.autograd.grad(attend(q, k, v), (q, k, v), dout)  # returned, not accumulated

                return run

            cases = [("attention_fwd", shape, setup_fwd), ("attention_fwd_bwd", shape, setup_fwd_bwd)]
            if dropout_p > 0:
                dropped = lambda impl=impl: setup_fwd_bwd(impl, dropout_p)  # noqa: E731
                cases.append(("attention_dropout_fwd_bwd", f"{shape}xp{dropout_p:g}", dropped))
            for case, case_shape, setup in cases:
                flops = flops_fwd if case == "attention_fwd" else flops_fwd_bwd
                rec.measure(
                    case, impl, case_shape, dtype_name(dtype), setup, tflops(flops), timing=timing, shapes=shapes
                )


# ---- LayerNorm ---------------------------------------------------------------------------------------------


def layer_norm_for(impl: str, device: torch.device):
    if impl == "cutile":
        reason = cutile_unavailable(device)
        if reason:
            raise Skip(reason)
        from gptcore import kernels

        return kernels.layer_norm
    return lambda x, w, bias, eps: F.layer_norm(x, (x.shape[-1],), w, bias, eps)


def layernorm_rows(
    rec: Recorder, shapes: str, n: int, c: int, dtype: torch.dtype, timings: tuple[str, ...] = ("eager",)
) -> None:
    """LayerNorm over (N, C) rows with weight and bias, forward and forward+backward, cuTile and torch; with
    graph timing also the memory floor (a copy, then an add, of the same bytes)."""
    device = rec.device
    shape = f"N{n}xC{c}"
    esize = torch.empty((), dtype=dtype).element_size()
    fwd_bytes, fwd_bwd_bytes = layernorm_bytes(n, c, esize), layernorm_bytes(n, c, esize, backward=True)

    def inputs(grad: bool):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, c, device=device, dtype=dtype, generator=g).requires_grad_(grad)
        w = (1 + 0.1 * torch.randn(c, device=device, dtype=dtype, generator=g)).requires_grad_(grad)
        bias = (0.1 * torch.randn(c, device=device, dtype=dtype, generator=g)).requires_grad_(grad)
        return x, w, bias

    for timing in timings:
        for impl in ["cutile", "torch"]:

            def setup_fwd(impl=impl):
                norm = layer_norm_for(impl, device)
                x, w, bias = inputs(False)

                def run():
                    with torch.no_grad():
                        norm(x, w, bias, 1e-5)

                return run

            def setup_fwd_bwd(impl=impl):
                norm = layer_norm_for(impl, device)
                x, w, bias = inputs(True)
                dy = torch.randn_like(x)

                def run():
                    torch.autograd.grad(norm(x, w, bias, 1e-5), (x, w, bias), dy)

                return run

            for case, setup, nbytes in (
                ("layernorm_fwd", setup_fwd, fwd_bytes),
                ("layernorm_fwd_bwd", setup_fwd_bwd, fwd_bwd_bytes),
            ):
                rec.measure(case, impl, shape, dtype_name(dtype), setup, gbps(nbytes), timing=timing, shapes=shapes)
        if timing == "graph":
            memory_floor_rows(rec, shapes, shape, n, c, dtype, fwd_bytes, fwd_bwd_bytes)


def memory_floor_rows(
    rec: Recorder, shapes: str, shape: str, n: int, c: int, dtype: torch.dtype, fwd_bytes: float, fwd_bwd_bytes: float
) -> None:
    """A reference, not a LayerNorm: the GPU time of moving the forward's bytes (a copy: read x, write y),
    and then the backward's (an add: read x and dy, write dx): what the memory system alone allows."""
    x, dy = (torch.randn(n, c, device=rec.device, dtype=dtype) for _ in range(2))
    y, dx = torch.empty_like(x), torch.empty_like(x)
    note = "copy x -> y (forward), then x + dy -> dx (backward): the bytes alone"
    rec.measure(
        "layernorm_fwd",
        "memory floor",
        shape,
        dtype_name(dtype),
        lambda: lambda: y.copy_(x),
        gbps(fwd_bytes),
        timing="graph",
        shapes=shapes,
        note=note,
    )

    def copy_then_add():
        y.copy_(x)
        torch.add(x, dy, out=dx)

    rec.measure(
        "layernorm_fwd_bwd",
        "memory floor",
        shape,
        dtype_name(dtype),
        lambda: copy_then_add,
        gbps(fwd_bwd_bytes),
        timing="graph",
        shapes=shapes,
        note=note,
    )


# ---- host time -------------------------------------------------------------------------------------------


def cutile_ops(device: torch.device):
    """The cuTile custom operators themselves (what torch.compile's graphs call), as attention and LayerNorm
    functions: the eager path beside them skips their dispatch."""
    reason = cutile_unavailable(device)
    if reason:
        raise Skip(reason)
    from gptcore.kernels import attention, layernorm

    def attend(q, k, v):
        return attention.attention_fwd_op(q, k, v, None, q.shape[-1] ** -0.5, 0.0)[0]

    def norm(x, w, bias, eps):
        return layernorm.layer_norm_fwd_op(x, w, bias, eps)[0]

    return attend, norm


def host_rows(rec: Recorder, dtype: torch.dtype = torch.bfloat16) -> None:
    """Host time of one eager call at tiny sizes (the GPU's share is negligible), forward alone and forward
    with backward: the launch path's cost per implementation. `cutile` is the path a module takes in eager
    mode, `cutile-op` the custom operators that traced code calls."""
    device = rec.device
    b, h, t, d = 1, 1, 64, 64
    rows, width = 64, 384

    def attention_setup(impl, grad):
        def setup():
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)
            )
            if impl == "cutile":
                attend = cutile_attention(device, dtype)
            elif impl == "cutile-op":
                attend = cutile_ops(device)[0]
            else:
                attend = sdpa_attention(impl, device, q, k, v)
            if not grad:
                return lambda: attend(q, k, v)
            dout = torch.randn_like(q)
            return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dout)

        return setup

    def layernorm_setup(impl, grad):
        def setup():
            norm = cutile_ops(device)[1] if impl == "cutile-op" else layer_norm_for(impl, device)
            x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=grad)
            w = torch.ones(width, device=device, dtype=dtype, requires_grad=grad)
            bias = torch.zeros(width, device=device, dtype=dtype, requires_grad=grad)
            if not grad:
                return lambda: norm(x, w, bias, 1e-5)
            dy = torch.randn_like(x)
            return lambda: torch.autograd.grad(norm(x, w, bias, 1e-5), (x, w, bias), dy)

        return setup

    for case, shape, impls, setup in (
        ("attention_host", f"B{b}xH{h}xT{t}xD{d}", ["cutile", "cutile-op", *SDPA_BACKENDS], attention_setup),
        ("layernorm_host", f"N{rows}xC{width}", ["cutile", "cutile-op", "torch"], layernorm_setup),
    ):
        for grad in (False, True):
            for impl in impls:
                row = case if grad else f"{case}_fwd"
                rec.measure(row, impl, shape, dtype_name(dtype), setup(impl, grad), host_us, timing="host")


# ---- the shapes of a model ---------------------------------------------------------------------------------


def kernel_rows(
    rec: Recorder,
    config: GPTConfig,
    shape_sets: list[str],
    model_batch: int,
    gpt2_batch: int,
    dtypes: list[torch.dtype],
    timings: tuple[str, ...] = ("eager",),
    dropout_p: float = 0.0,
) -> None:
    """Attention (with dropout_p > 0 also with attention dropout) and LayerNorm at a model's shapes (`model`:
    model_batch x the config's) and at GPT-2 small's (`gpt2_small`: gpt2_batch x 12 heads x 1024 x 64, 768
    wide)."""
    for dtype in dtypes:
        for shapes in shape_sets:
            if shapes == "model":
                b, h, t, c = model_batch, config.n_head, config.block_size, config.n_embd
            else:
                b, h, t, c = gpt2_batch, GPT2_SMALL["n_head"], GPT2_SMALL["block_size"], GPT2_SMALL["n_embd"]
            attention_rows(rec, shapes, b, h, t, c // h, dtype, timings, dropout_p)
            layernorm_rows(rec, shapes, b * t, c, dtype, timings)


# ---- the command line --------------------------------------------------------------------------------------


def print_table(records: list[dict]) -> None:
    """One line per case, shape and implementation: eager and graph ms side by side, with the speedup."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["case"], r["shape"], r["implementation"])
        rows.setdefault(key, {})[r.get("timing", "eager")] = r
    print(
        f"\n{'case':20s} {'shape':20s} {'implementation':16s} {'eager ms':>10s} {'graph ms':>10s} "
        f"{'x ref (graph)':>13s}  figure"
    )
    for (case, shape, impl), by_timing in rows.items():

        def ms(timing):
            r = by_timing.get(timing)
            return f"{r['ms']:.4f}" if r and r["status"] == OK else ("-" if r is None else r["status"])

        best = by_timing.get("graph") or by_timing.get("eager") or by_timing.get("host")
        speed = f"{best['speedup']:.2f}x" if best and "speedup" in best else ""
        figure = next(
            (
                f"{best[k]:.0f} {unit}"
                for k, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("host_us", "us host"))
                if best and k in best
            ),
            "",
        )
        eager = ms("host") if "host" in by_timing else ms("eager")
        print(f"{case:20s} {shape:20s} {impl:16s} {eager:>10s} {ms('graph'):>10s} {speed:>13s}  {figure}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph replays (GPU time only)")
    ap.add_argument("--host", action="store_true", help="also the host time per eager call at tiny sizes")
    ap.add_argument("--quick", action="store_true", help="one attention shape and one LayerNorm shape")
    ap.add_argument("--dropout", type=float, default=0.2, help="attention dropout of the dropout rows (0: none)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="write every record to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: the kernel benchmark needs one", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rec = Recorder(device, Timer(device, warmup=5, repeats=args.repeats, min_repeat_ms=5.0))
    print(f"kernel bench on {rec.env['device']} (torch {rec.env['torch']}, cuda-tile {rec.env['cuda_tile']})")
    timings = ("eager", "graph") if args.graphs else ("eager",)
    if args.host:
        host_rows(rec)
    for b, h, t, d in ATTN_SHAPES[1:2] if args.quick else ATTN_SHAPES:
        attention_rows(rec, "kernel bench", b, h, t, d, torch.bfloat16, timings, args.dropout)
    for n, c in LN_SHAPES[:1] if args.quick else LN_SHAPES:
        layernorm_rows(rec, "kernel bench", n, c, torch.bfloat16, timings)
    add_speedups(rec.records, REFERENCE)
    print_table(rec.records)
    if args.json:
        from gptcore.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({record_id(r): r for r in rec.records}, indent=1) + "\n")
    return 1 if any(r["status"] == "failed" for r in rec.records) else 0


if __name__ == "__main__":
    sys.exit(main())
