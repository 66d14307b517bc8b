"""Benchmarks: the cuTile model and kernels against PyTorch, measured side by side in one process.

Every figure is the median over `repeats` timed repeats after `warmup` untimed calls (compilation,
autotuning and the allocator settle there), with the spread (min, max) beside it. On a GPU a repeat is
timed with CUDA events on the stream; on a CPU with perf_counter. A call much shorter than
`min_repeat_ms` is looped inside a repeat, so the timer's own resolution and the launch of the timing
events do not dominate a 30 us kernel.

Each measurement becomes one record (a dict): case, implementation, shape, dtype, status
(`ok` | `skipped` | `failed`), the reason when not ok, the figures, and the device and versions. A row
that cannot run here (cuTile without a GPU, an SDPA backend this device lacks, a CUDA graph that cannot
be captured) is `skipped` with the reason: nothing silently falls back to another implementation.

Cases:
- kernels: causal attention forward and forward+backward (cuTile; SDPA with each backend), LayerNorm
  forward and forward+backward (cuTile; torch), at the trained model's shapes and at GPT-2 small's.
- train_step: one optimizer step of the trained model's config (reference eager, reference compiled,
  cuTile; reference and cuTile captured as one CUDA graph, as `train.cuda_graph` runs them), as the train
  stage runs it (autocast, grad clipping, AdamW).
- prefill: one forward over a full block into an empty KV cache.
- decode: generation from a short prompt to the end of the block, per backend and batch size: with
  the KV cache (eager, and replayed as CUDA graphs), and uncached (the whole context per token, as the
  reference does) for comparison.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gptcore.cutile_model import CuTileGPT
from gptcore.kernels.bench import attention_flops, layernorm_bytes  # one definition of the work
from gptcore.model import GPT, GPTConfig, gpt_from_checkpoint
from gptcore.sampling import (BackendUnavailable, Decoder, cutile_unavailable_reason, generate_uncached,
                              load_for_inference)
from gptcore.train_graph import GraphCaptureError, GraphedTrainStep

OK, SKIPPED, FAILED = "ok", "skipped", "failed"

# The implementation each speedup is relative to, per case (the first one measured in the list).
REFERENCE = {
    "attention_fwd": ["sdpa-flash", "sdpa-math"],
    "attention_fwd_bwd": ["sdpa-flash", "sdpa-math"],
    "layernorm_fwd": ["torch"],
    "layernorm_fwd_bwd": ["torch"],
    "train_step": ["torch eager"],
    "prefill": ["torch"],
    "decode": ["torch uncached"],
}
GPT2_SMALL = dict(n_head=12, block_size=1024, n_embd=768)
SAMPLING = dict(temperature=0.8, top_k=200, top_p=None)  # the sample stage's defaults
DECODE_SEED = 1234


class Skip(Exception):
    """A row that cannot run here; the message is the reason recorded."""


# ---- where and with what ---------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    """What every record carries: the device and the versions the figures belong to."""
    return {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cuda_tile": package_version("cuda-tile")}


cutile_skip_reason = cutile_unavailable_reason  # why the cuTile rows cannot run here, or None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_cuda_graphs(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip(f"CUDA graphs need a CUDA device; this run is on {device.type}")


# ---- timing ------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timer:
    device: torch.device
    warmup: int = 2
    repeats: int = 5
    min_repeat_ms: float = 10.0

    def _once(self, fn: Callable[[], object], calls: int) -> float:
        """Milliseconds per call over `calls` back-to-back calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1000 / calls

    def __call__(self, fn: Callable[[], object]) -> dict:
        synchronize(self.device)
        for _ in range(self.warmup):
            estimate = self._once(fn, 1)
        calls = max(1, math.ceil(self.min_repeat_ms / max(estimate, 1e-3)))
        times = [self._once(fn, calls) for _ in range(self.repeats)]
        return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
                "repeats": self.repeats, "calls_per_repeat": calls}


class Recorder:
    """Runs measurements and keeps one record per case; a failure becomes a `failed` row, not a crash."""

    def __init__(self, device: torch.device, timer: Timer, log: Callable[[str], None] = print):
        self.device = device
        self.timer = timer
        self.env = environment(device)
        self.records: list[dict] = []
        self.log = log

    def add(self, case: str, implementation: str, shape: str, dtype: str, status: str, reason: str | None = None,
            **fields) -> dict:
        rec = {"case": case, "implementation": implementation, "shape": shape, "dtype": dtype, "status": status,
               "reason": reason, **fields, **self.env}
        self.records.append(rec)
        figure = (f"{rec['ms']:10.3f} ms" if status == OK else f"{status}: {reason}")
        self.log(f"  {case:<18} {shape:<22} {dtype:<9} {implementation:<28} {figure}")
        return rec

    def measure(self, case: str, implementation: str, shape: str, dtype: str, setup: Callable[[], Callable],
                figures: Callable[[float], dict] = lambda ms: {}, **fields) -> dict:
        """`setup()` builds the call to time (raising Skip when it cannot run); `figures(ms)` derives
        throughput figures from the median time."""
        try:
            fn = setup()
            timing = self.timer(fn)
        except Skip as e:
            return self.add(case, implementation, shape, dtype, SKIPPED, str(e), **fields)
        except Exception as e:  # noqa: BLE001 - recorded, and the stage reports failed rows at the end
            return self.add(case, implementation, shape, dtype, FAILED, f"{type(e).__name__}: {e}", **fields)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.add(case, implementation, shape, dtype, OK, None, **timing, **figures(timing["ms"]), **fields)


# ---- kernels ------------------------------------------------------------------------------------------------

SDPA_BACKENDS = {  # implementation name -> torch.nn.attention.SDPBackend member name
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}


def _sdpa_fn(backend: str, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
    if member is None:
        raise Skip(f"this torch ({torch.__version__}) has no SDPA backend {SDPA_BACKENDS[backend]}")
    if device.type != "cuda" and backend in ("sdpa-cudnn", "sdpa-efficient"):
        raise Skip(f"SDPA's {backend.removeprefix('sdpa-')} backend runs on CUDA only, not on {device.type}")

    def attend(q, k, v):
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def _first_call(fn, *args):
    """Call once, turning "this backend cannot take these inputs" into a Skip with torch's own reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(*args)
        except RuntimeError as e:
            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                raise
            why = "; ".join(str(w.message).splitlines()[0] for w in caught) or str(e).splitlines()[0]
            raise Skip(f"SDPA backend not available for these inputs: {why}") from None


def attention_rows(rec: Recorder, shapes: str, b: int, h: int, t: int, d: int, dtype: torch.dtype) -> None:
    """Causal attention (B, H, T, D) forward and forward+backward, cuTile and every SDPA backend.
    FLOPs as the kernel benchmarks count them (gptcore.kernels.bench): the forward's two T x T x D
    products, half of them masked; the backward 2.5x the forward."""
    device = rec.device
    shape = f"B{b}xH{h}xT{t}xD{d}"
    flops_fwd, flops_fwd_bwd = attention_flops(b, h, t, d), attention_flops(b, h, t, d, backward=True)

    def inputs(grad: bool):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_(grad)
                   for _ in range(3))
        return q, k, v

    def attend_for(impl: str):
        if impl == "cutile":
            reason = cutile_skip_reason(device)
            if reason:
                raise Skip(reason)
            if dtype not in (torch.bfloat16, torch.float16):
                raise Skip(f"the cuTile attention kernel runs in bfloat16/float16, not {dtype_name(dtype)}")
            from gptcore import kernels
            return kernels.causal_attention
        return _sdpa_fn(impl, device)

    for impl in ["cutile", *SDPA_BACKENDS]:
        def setup_fwd(impl=impl):
            attend = attend_for(impl)
            q, k, v = inputs(False)
            _first_call(attend, q, k, v)

            def run():
                with torch.no_grad():
                    attend(q, k, v)
            return run

        def setup_fwd_bwd(impl=impl):
            attend = attend_for(impl)
            q, k, v = inputs(True)
            out = _first_call(attend, q, k, v)
            dout = torch.randn_like(out)

            def run():
                o = attend(q, k, v)
                torch.autograd.grad(o, (q, k, v), dout)  # grads returned, not accumulated into .grad
            return run

        rec.measure("attention_fwd", impl, shape, dtype_name(dtype), setup_fwd,
                    lambda ms: {"tflops": flops_fwd / ms / 1e9}, shapes=shapes)
        rec.measure("attention_fwd_bwd", impl, shape, dtype_name(dtype), setup_fwd_bwd,
                    lambda ms: {"tflops": flops_fwd_bwd / ms / 1e9}, shapes=shapes)


def layernorm_rows(rec: Recorder, shapes: str, n: int, c: int, dtype: torch.dtype) -> None:
    """LayerNorm over (N, C) rows with weight and bias, forward and forward+backward, cuTile and torch.
    GB/s counts the fewest bytes, as gptcore.kernels.bench does: the forward reads x and writes y (and
    the fp32 mean and rstd), the backward reads x and dy and writes dx."""
    device = rec.device
    shape = f"N{n}xC{c}"
    esize = torch.empty((), dtype=dtype).element_size()

    def norm_for(impl: str):
        if impl == "cutile":
            reason = cutile_skip_reason(device)
            if reason:
                raise Skip(reason)
            from gptcore import kernels
            return kernels.layer_norm
        return lambda x, w, bias, eps: F.layer_norm(x, (c,), w, bias, eps)

    def inputs(grad: bool):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, c, device=device, dtype=dtype, generator=g).requires_grad_(grad)
        w = (1 + 0.1 * torch.randn(c, device=device, dtype=dtype, generator=g)).requires_grad_(grad)
        bias = (0.1 * torch.randn(c, device=device, dtype=dtype, generator=g)).requires_grad_(grad)
        return x, w, bias

    for impl in ["cutile", "torch"]:
        def setup_fwd(impl=impl):
            norm = norm_for(impl)
            x, w, bias = inputs(False)

            def run():
                with torch.no_grad():
                    norm(x, w, bias, 1e-5)
            return run

        def setup_fwd_bwd(impl=impl):
            norm = norm_for(impl)
            x, w, bias = inputs(True)
            dy = torch.randn_like(x)

            def run():
                y = norm(x, w, bias, 1e-5)
                torch.autograd.grad(y, (x, w, bias), dy)
            return run

        rec.measure("layernorm_fwd", impl, shape, dtype_name(dtype), setup_fwd,
                    lambda ms: {"gbps": layernorm_bytes(n, c, esize) / ms / 1e6}, shapes=shapes)
        rec.measure("layernorm_fwd_bwd", impl, shape, dtype_name(dtype), setup_fwd_bwd,
                    lambda ms: {"gbps": layernorm_bytes(n, c, esize, backward=True) / ms / 1e6}, shapes=shapes)


def kernel_rows(rec: Recorder, config: GPTConfig, shape_sets: list[str], model_batch: int, gpt2_batch: int,
                dtypes: list[torch.dtype]) -> None:
    for dtype in dtypes:
        for shapes in shape_sets:
            if shapes == "model":
                b, h, t, c = model_batch, config.n_head, config.block_size, config.n_embd
            else:
                b, h, t, c = gpt2_batch, GPT2_SMALL["n_head"], GPT2_SMALL["block_size"], GPT2_SMALL["n_embd"]
            attention_rows(rec, shapes, b, h, t, c // h, dtype)
            layernorm_rows(rec, shapes, b * t, c, dtype)


# ---- models --------------------------------------------------------------------------------------------------

def train_model(checkpoint: dict, backend: str, device: torch.device) -> GPT:
    """The checkpoint's model for the train step: fp32 weights (autocast does the rest), its dropout."""
    if backend == "cutile":
        reason = cutile_skip_reason(device)
        if reason:
            raise Skip(reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cuTile attention-dropout note: the record carries the dropout
        model = gpt_from_checkpoint(checkpoint, CuTileGPT if backend == "cutile" else GPT)
    return model.to(device).train()


def inference_model(checkpoint: dict, backend: str, device: torch.device, dtype: torch.dtype) -> GPT:
    try:
        return load_for_inference(checkpoint, backend, device, dtype)
    except BackendUnavailable as e:
        raise Skip(str(e).removeprefix("backend 'cutile' cannot run: ")) from None


def graphed_train_step(model: GPT, optimizer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                       lr: float) -> Callable[[], object]:
    """The step of `train_step_rows` captured as a CUDA graph (gptcore/train_graph.py), past its eager
    warm-up steps and the capture, so that only replays are timed."""
    try:
        graphed = GraphedTrainStep(model, optimizer, dtype=dtype, micro_steps=1, batch_size=x.size(0),
                                   block_size=x.size(1), grad_clip=1.0)
    except ValueError as e:  # a setting the graphed step refuses (float16), with its reason
        raise Skip(str(e)) from None
    xs, ys = x[None], y[None]
    try:
        while not graphed.captured:
            graphed.step(xs, ys, lr)
    except GraphCaptureError as e:
        raise Skip(str(e)) from None
    return lambda: graphed.step(xs, ys, lr)


def train_step_rows(rec: Recorder, checkpoint: dict, batch: int, dtype: torch.dtype, backends: list[str],
                    compile_setting: bool | str = "auto") -> None:
    """One training step as the train stage runs it: forward and loss under autocast, backward, gradient
    clipping at 1.0, fused AdamW on CUDA; eagerly, compiled, or captured as one CUDA graph (`+graph`).
    Random tokens: the data does not change the time.
    `compile_setting` (bench.compile): True, False, or "auto" (on CUDA only)."""
    device = rec.device
    compile_on = compile_setting is True or (compile_setting == "auto" and device.type == "cuda")
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    shape = f"B{batch}xT{config.block_size}"
    tokens = batch * config.block_size
    lr = 1e-4
    rows = [("torch eager", "torch", False, False), ("torch compile", "torch", True, False),
            ("torch eager+graph", "torch", False, True), ("cutile", "cutile", False, False),
            ("cutile+graph", "cutile", False, True)]
    for impl, backend, use_compile, graph in rows:
        if backend not in backends:
            continue

        def setup(backend=backend, use_compile=use_compile, graph=graph):
            if use_compile and not compile_on:
                raise Skip(f"torch.compile row off (bench.compile: {compile_setting}, device {device.type}): "
                           "compiling takes minutes on a small CPU; set bench.compile: true to measure it")
            if graph:
                require_cuda_graphs(device)
            model = train_model(checkpoint, backend, device)
            optimizer = model.configure_optimizers(0.1, lr, (0.9, 0.99), device.type, capturable=graph)
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randint(config.vocab_size, (batch, config.block_size), device=device, generator=g)
            y = torch.randint(config.vocab_size, (batch, config.block_size), device=device, generator=g)
            if graph:
                return graphed_train_step(model, optimizer, x, y, dtype, lr)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            forward = torch.compile(model) if use_compile else model
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext())

            def step():
                with autocast:
                    _, loss = forward(x, y)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            return step

        notes = {}
        if backend == "cutile" and config.dropout > 0:
            notes["note"] = "the cuTile attention applies no dropout to attention probabilities"
        rec.measure("train_step", impl, shape, dtype_name(dtype), setup,
                    lambda ms: {"tokens_per_sec": tokens / ms * 1000, "ms_per_iter": ms},
                    dropout=config.dropout, **notes)


def inference_rows(rec: Recorder, checkpoint: dict, dtype: torch.dtype, backends: list[str], batch_sizes: list[int],
                   prompt_tokens: int, cuda_graph: bool) -> None:
    """Prefill ms for a full block, and decode tokens/s from `prompt_tokens` tokens to the end of the block:
    with the KV cache (eager; replayed as CUDA graphs) and uncached, per backend and batch size."""
    device = rec.device
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    block = config.block_size
    new_tokens = block - prompt_tokens
    for backend in ["torch", "cutile"]:
        if backend not in backends:
            continue
        try:
            model = inference_model(checkpoint, backend, device, dtype)
            load_error = None
        except Skip as e:
            model, load_error = None, str(e)

        def needs_model():
            if model is None:
                raise Skip(load_error)

        for batch in batch_sizes:
            # prefill: one forward of a full block into an empty cache (what a long prompt costs)
            def setup_prefill(batch=batch):
                needs_model()
                idx = torch.randint(config.vocab_size, (batch, block), device=device)
                cache = model.new_kv_cache(batch)

                def run():
                    for layer in cache:
                        layer.length = 0
                    with torch.no_grad():
                        model(idx, kv_cache=cache)
                return run

            rec.measure("prefill", backend, f"B{batch}xT{block}", dtype_name(dtype), setup_prefill,
                        lambda ms, batch=batch: {"tokens_per_sec": batch * block / ms * 1000})

            decode_rows(rec, model, load_error, backend, batch, prompt_tokens, new_tokens, dtype, cuda_graph)


def decode_rows(rec: Recorder, model: GPT | None, load_error: str | None, backend: str, batch: int,
                prompt_tokens: int, new_tokens: int, dtype: torch.dtype, cuda_graph: bool) -> None:
    device = rec.device
    shape = f"B{batch}xP{prompt_tokens}+{new_tokens}"
    outputs: dict[str, torch.Tensor] = {}

    def generator():
        return torch.Generator(device=device).manual_seed(DECODE_SEED)

    def prompt():
        g = torch.Generator(device=device).manual_seed(0)
        return torch.randint(model.config.vocab_size, (batch, prompt_tokens), device=device, generator=g)

    def check():
        if model is None:
            raise Skip(load_error)
        if new_tokens < 1:
            raise Skip(f"bench.prompt_tokens ({prompt_tokens}) leaves no room to decode in block_size "
                       f"{model.config.block_size}")

    def setup_uncached():
        check()
        idx = prompt()

        def run():
            outputs["uncached"] = generate_uncached(model, idx, new_tokens, generator=generator(), **SAMPLING)
        return run

    def setup_cached(graph: bool):
        def setup():
            check()
            if graph:
                require_cuda_graphs(device)
            if graph and not cuda_graph:
                raise Skip("off by bench.cuda_graph: false")
            idx = prompt()
            decoder = Decoder(model, batch, generator=generator(), cuda_graph=graph, **SAMPLING)
            decoder.generate(idx, new_tokens)  # first run: eager steps, each captured as a graph after it
            if graph and decoder.graph_error:
                # The graphs are what this row measures: without them it would only repeat the eager row.
                raise Skip(decoder.graph_error)
            key = "kv_cache+cuda_graph" if graph else "kv_cache"

            def run():
                decoder.generator.manual_seed(DECODE_SEED)  # every repeat draws the same tokens
                outputs[key] = decoder.generate(idx, new_tokens)
            return run
        return setup

    def tokens_per_sec(ms: float) -> dict:
        return {"tokens_per_sec": batch * new_tokens / ms * 1000, "ms_per_token": ms / new_tokens,
                "new_tokens": new_tokens}

    records = {}
    for variant, setup in (("uncached", setup_uncached), ("kv_cache", setup_cached(False)),
                           ("kv_cache+cuda_graph", setup_cached(True))):
        records[variant] = rec.measure("decode", f"{backend} {variant}", shape, dtype_name(dtype), setup,
                                       tokens_per_sec, backend=backend, variant=variant, batch=batch)
    base = records["uncached"]
    for variant in ("kv_cache", "kv_cache+cuda_graph"):
        r = records[variant]
        if r["status"] == OK and base["status"] == OK:
            # the 5x criterion: cached vs regenerating the whole context, same backend, same run
            r["speedup_vs_uncached"] = r["tokens_per_sec"] / base["tokens_per_sec"]
        if variant in outputs and "uncached" in outputs:
            r["same_tokens_as_uncached"] = bool(torch.equal(outputs[variant], outputs["uncached"]))


# ---- summary -----------------------------------------------------------------------------------------------

def add_speedups(records: list[dict]) -> None:
    """`speedup`: how many times faster than the case's PyTorch reference (REFERENCE) on the same shape and
    dtype; 1.0 for the reference itself. What the bench plot shows."""
    by_key = {(r["case"], r["shape"], r["dtype"], r["implementation"]): r for r in records if r["status"] == OK}
    for r in records:
        if r["status"] != OK:
            continue
        for ref_impl in REFERENCE.get(r["case"], []):
            ref = by_key.get((r["case"], r["shape"], r["dtype"], ref_impl))
            if ref is not None:
                r["speedup"] = ref["ms"] / r["ms"]
                r["reference"] = ref_impl
                break


def record_id(r: dict) -> str:
    return f"{r['case']}/{r['shape']}/{r['dtype']}/{r['implementation']}"


def plot_rows(records: list[dict]) -> list[dict]:
    """One bar per measured row: its speed relative to the case's PyTorch reference."""
    return [{"benchmark": f"{r['case']} {r['shape']} {r['dtype']} | {r['implementation']}",
             "speedup": round(r["speedup"], 4), "ms": round(r["ms"], 4)}
            for r in records if r["status"] == OK and "speedup" in r]
