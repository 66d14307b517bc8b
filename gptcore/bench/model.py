"""Model benchmarks: one training step (eager, compiled, captured as one CUDA graph), prefill of a full
block, and decoding (with the KV cache, eager and replayed as CUDA graphs, and uncached), for the reference
and the cuTile model, as rows of the one record schema (gptcore.bench.timing).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from gptcore.bench import profile
from gptcore.bench.timing import OK, Recorder, Skip, require_cuda_graphs
from gptcore.checkpoint import gpt_from_checkpoint
from gptcore.cutile_model import model_class
from gptcore.devices import dtype_name
from gptcore.errors import BackendUnavailable
from gptcore.kernels.runtime import cutile_unavailable
from gptcore.model import GPT, GPTConfig
from gptcore.sampling import Decoder, load_for_inference
from gptcore.train_graph import GraphCaptureError
from gptcore.train_step import make_train_step

# The implementation each speedup is relative to, per case (the first one measured in the list).
REFERENCE = {
    "train_step": ["torch eager"],
    "prefill": ["torch"],
    "decode": ["torch kv_cache"],
}
SAMPLING = dict(temperature=0.8, top_k=200, top_p=None)  # the sample stage's defaults
DECODE_SEED = 1234


def train_model(checkpoint: dict, backend: str, device: torch.device) -> GPT:
    """The checkpoint's model for the train step: fp32 weights (autocast does the rest), its dropout."""
    reason = cutile_unavailable(device) if backend == "cutile" else None
    if reason:
        raise Skip(reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cuTile attention-dropout note: the record carries the dropout
        model = gpt_from_checkpoint(checkpoint, model_class(backend))
    return model.to(device).train()


def inference_model(checkpoint: dict, backend: str, device: torch.device, dtype: torch.dtype) -> GPT:
    try:
        return load_for_inference(checkpoint, backend, device, dtype)
    except BackendUnavailable as e:
        raise Skip(str(e)) from None


def train_step(
    checkpoint: dict,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    use_compile: bool | str = False,
    graph: bool = False,
    micro_steps: int = 1,
) -> Callable[[], object]:
    """One training step as the train stage runs it (gptcore.train_step.make_train_step): forward and
    loss under autocast, backward, gradient clipping at 1.0, fused AdamW on CUDA; eagerly, compiled, or
    captured as one CUDA graph (past its eager warm-up steps and the capture, so that only replays are
    timed). `use_compile`: True, or torch.compile's mode ("reduce-overhead"); `micro_steps`: micro-batches of
    `batch` rows per step (gradient accumulation). Random tokens: the data does not change the time. Raises Skip
    when it cannot run here."""
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    lr = 1e-4
    if graph:
        require_cuda_graphs(device)
    model = train_model(checkpoint, backend, device)
    optimizer = model.configure_optimizers(0.1, lr, (0.9, 0.99), device.type, capturable=graph)
    g = torch.Generator(device=device).manual_seed(0)
    xs = torch.randint(config.vocab_size, (micro_steps, batch, config.block_size), device=device, generator=g)
    ys = torch.randint(config.vocab_size, (micro_steps, batch, config.block_size), device=device, generator=g)
    mode = "graph" if graph else "compile" if use_compile else "eager"
    try:
        step = make_train_step(
            model,
            optimizer,
            mode=mode,
            dtype=dtype,
            micro_steps=micro_steps,
            batch_size=batch,
            block_size=config.block_size,
            grad_clip=1.0,
            compile_mode=use_compile if isinstance(use_compile, str) else None,
        )
    except ValueError as e:  # a setting the graphed step refuses (float16), with its reason
        raise Skip(str(e)) from None
    if graph:
        try:
            while not step.captured:
                step.step(xs, ys, lr)
        except GraphCaptureError as e:
            raise Skip(str(e)) from None
    return lambda: step.step(xs, ys, lr)


def train_step_rows(
    rec: Recorder,
    checkpoint: dict,
    batch: int,
    dtype: torch.dtype,
    backends: list[str],
    compile_setting: bool | str = "auto",
) -> None:
    """The training step (`train_step`) eagerly, compiled (Inductor's default mode and reduce-overhead), and
    captured as one CUDA graph (`+graph`), per backend. `compile_setting` (bench.compile): True, False, or
    "auto" (on CUDA only)."""
    device = rec.device
    compile_on = compile_setting is True or (compile_setting == "auto" and device.type == "cuda")
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    shape = f"B{batch}xT{config.block_size}"
    tokens = batch * config.block_size
    rows = [
        ("torch eager", "torch", False, False),
        ("torch compile", "torch", True, False),
        ("torch compile reduce-overhead", "torch", "reduce-overhead", False),
        ("torch eager+graph", "torch", False, True),
        ("cutile", "cutile", False, False),
        ("cutile compile", "cutile", True, False),
        ("cutile compile reduce-overhead", "cutile", "reduce-overhead", False),
        ("cutile+graph", "cutile", False, True),
    ]
    for impl, backend, use_compile, graph in rows:
        if backend not in backends:
            continue

        def setup(backend=backend, use_compile=use_compile, graph=graph):
            if use_compile and not compile_on:
                raise Skip(
                    f"torch.compile row off (bench.compile: {compile_setting}, device {device.type}): "
                    "compiling takes minutes on a small CPU; set bench.compile: true to measure it"
                )
            return train_step(checkpoint, backend, device, dtype, batch, use_compile, graph)

        rec.measure(
            "train_step",
            impl,
            shape,
            dtype_name(dtype),
            setup,
            lambda ms: {"tokens_per_sec": tokens / ms * 1000, "ms_per_iter": ms},
            dropout=config.dropout,
        )


def step_profiles(
    checkpoint: dict, batch: int, dtype: torch.dtype, backends: list[str], device: torch.device, device_name: str
) -> dict[str, dict]:
    """Per backend, where one eager training step's kernel time goes (gptcore.bench.profile), or why it
    could not be profiled here ({"skipped": reason})."""
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    profiles = {}
    for backend in ("torch", "cutile"):
        if backend not in backends:
            continue
        try:
            step = train_step(checkpoint, backend, device, dtype, batch)
        except Skip as e:
            profiles[backend] = {"skipped": str(e)}
            continue
        kernels = profile.kernel_times(step, device)
        table = profile.category_table(kernels, profile.StepFlops.of(config, batch), device_name)
        profiles[backend] = {"shape": f"B{batch}xT{config.block_size}", "dtype": dtype_name(dtype), **table}
        profiles[backend]["top_kernels"] = profile.top_kernels(kernels)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return profiles


def inference_rows(
    rec: Recorder,
    checkpoint: dict,
    dtype: torch.dtype,
    backends: list[str],
    batch_sizes: list[int],
    prompt_tokens: int,
    cuda_graph: bool,
    uncached_tokens: int = 32,
    decode_tokens: int | None = None,
    tokens_per_graph: int = 1,
) -> None:
    """Prefill ms for a full block, and decode tokens/s from `prompt_tokens` tokens on, `decode_tokens` of them
    (None: to the end of the block): with the KV cache (eager; replayed as CUDA graphs of `tokens_per_graph`
    steps) and uncached (on `uncached_tokens` of them), per backend and batch size."""
    device = rec.device
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    block = config.block_size
    new_tokens = block - prompt_tokens if decode_tokens is None else min(decode_tokens, block - prompt_tokens)
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

            rec.measure(
                "prefill",
                backend,
                f"B{batch}xT{block}",
                dtype_name(dtype),
                setup_prefill,
                lambda ms, batch=batch: {"tokens_per_sec": batch * block / ms * 1000},
                batch=batch,
            )

            decode_rows(
                rec, model, load_error, backend, batch, prompt_tokens, new_tokens, dtype, cuda_graph, uncached_tokens,
                tokens_per_graph,
            )  # fmt: skip


def decode_rows(
    rec: Recorder,
    model: GPT | None,
    load_error: str | None,
    backend: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    dtype: torch.dtype,
    cuda_graph: bool,
    uncached_tokens: int,
    tokens_per_graph: int = 1,
) -> None:
    """Decoding `new_tokens` after `prompt_tokens` with the KV cache (eager; replayed as CUDA graphs of
    `tokens_per_graph` steps), and uncached regeneration timed on `uncached_tokens` tokens from the middle of
    that run: its cost per token grows with the context, and the middle tokens cost the run's average. Each row reports
    ms per token; the uncached row continues the eager row's tokens with its generator's state, so the
    two can be checked to sample the same tokens."""
    device = rec.device
    shape = f"B{batch}xP{prompt_tokens}+{new_tokens}"
    timed = min(uncached_tokens, new_tokens)
    start = prompt_tokens + (new_tokens - timed) // 2  # the uncached row's context when it starts
    outputs: dict[str, torch.Tensor] = {}
    state_at_start: dict[str, torch.Tensor] = {}

    def generator():
        return torch.Generator(device=device).manual_seed(DECODE_SEED)

    def prompt(length: int):
        g = torch.Generator(device=device).manual_seed(0)
        return torch.randint(model.config.vocab_size, (batch, length), device=device, generator=g)

    def check():
        if model is None:
            raise Skip(load_error)
        if new_tokens < 1:
            raise Skip(
                f"bench.prompt_tokens ({prompt_tokens}) leaves no room to decode in block_size "
                f"{model.config.block_size}"
            )

    def setup_cached(graph: bool):
        def setup():
            check()
            if graph:
                require_cuda_graphs(device)
            if graph and not cuda_graph:
                raise Skip("off by bench.cuda_graph: false")
            idx = prompt(prompt_tokens)
            steps = tokens_per_graph if graph else 1
            decoder = Decoder(model, batch, generator=generator(), cuda_graph=graph, tokens_per_graph=steps, **SAMPLING)
            # First run: eager steps (each captured as a graph after it); the eager one also keeps the
            # generator's state where the uncached row starts.
            tokens, drawn = [idx], start - prompt_tokens  # tokens drawn before the uncached row's start
            if not graph and drawn == 0:
                state_at_start["state"] = decoder.generator.get_state()
            for step, token in enumerate(decoder.stream(idx, new_tokens)):
                tokens.append(token)
                if not graph and step + 1 == drawn:
                    state_at_start["state"] = decoder.generator.get_state()
            if graph and decoder.graph_error:
                # The graphs are what this row measures: without them it would only repeat the eager row.
                raise Skip(decoder.graph_error)
            key = "kv_cache+cuda_graph" if graph else "kv_cache"
            outputs[key] = torch.cat(tokens, dim=1)

            def run():
                decoder.generator.manual_seed(DECODE_SEED)  # every repeat draws the same tokens
                decoder.generate(idx, new_tokens)

            return run

        return setup

    def setup_uncached():
        check()
        reference = outputs.get("kv_cache")
        # The eager row's context and generator state where the timed tokens start; without that row, a
        # random context of the same length.
        idx = reference[:, :start] if reference is not None else prompt(start)
        decoder = Decoder(model, batch, kv_cache=False, **SAMPLING)

        def run():
            decoder.generator = generator()
            if reference is not None:
                decoder.generator.set_state(state_at_start["state"])  # every repeat draws the same tokens
            outputs["uncached"] = decoder.generate(idx, timed)

        return run

    def per_token(tokens: int):
        return lambda ms: {
            "tokens_per_sec": batch * tokens / ms * 1000,
            "ms_per_token": ms / tokens,
            "new_tokens": tokens,
        }

    records = {}
    for variant, setup, row_shape, tokens in (
        ("kv_cache", setup_cached(False), shape, new_tokens),
        ("kv_cache+cuda_graph", setup_cached(True), shape, new_tokens),
        ("uncached", setup_uncached, f"B{batch}xP{start}+{timed}", timed),
    ):
        records[variant] = rec.measure(
            "decode",
            f"{backend} {variant}",
            row_shape,
            dtype_name(dtype),
            setup,
            per_token(tokens),
            backend=backend,
            variant=variant,
            batch=batch,
            tokens_per_graph=tokens_per_graph if variant == "kv_cache+cuda_graph" else 1,
        )
    base = records["uncached"]
    for variant in ("kv_cache", "kv_cache+cuda_graph"):
        r = records[variant]
        if r["status"] == OK and base["status"] == OK:
            # cached against regenerating the whole context, per token, same backend, same run
            r["speedup_vs_uncached"] = base["ms_per_token"] / r["ms_per_token"]
        if variant in outputs and "uncached" in outputs and "kv_cache" in outputs:
            same = outputs["uncached"][:, start : start + timed]
            r["same_tokens_as_uncached"] = bool(torch.equal(outputs[variant][:, start : start + timed], same))


# metrics/bench.json: (name, case, implementation, batch or None for the first measured, field of the row).
# Few and flat, with names no other metrics file uses, so `dvc exp show` and `dvc metrics show` fit a terminal.
HEADLINE = (
    ("torch_step_ms", "train_step", "torch eager", None, "ms"),
    ("cutile_step_ms", "train_step", "cutile", None, "ms"),
    ("torch_decode_ms", "decode", "torch kv_cache", 1, "ms_per_token"),
    ("cutile_decode_ms", "decode", "cutile kv_cache", 1, "ms_per_token"),
    ("torch_decode_graph_ms", "decode", "torch kv_cache+cuda_graph", 1, "ms_per_token"),
    ("cutile_decode_graph_ms", "decode", "cutile kv_cache+cuda_graph", 1, "ms_per_token"),
)


def first_row(records: list[dict], case: str, implementation: str, batch: int | None = None) -> dict | None:
    """The first measured row of a case and implementation (at `batch`, when given), or None."""
    return next(
        (
            r
            for r in records
            if r["status"] == OK
            and r["case"] == case
            and r["implementation"] == implementation
            and (batch is None or r.get("batch") == batch)
        ),
        None,
    )


def row_counts(records: list[dict]) -> dict[str, int]:
    return {status: sum(r["status"] == status for r in records) for status in (OK, "skipped", "failed")}


def headline_metrics(records: list[dict], profiles: dict[str, dict] | None = None) -> dict:
    """The few numbers metrics/bench.json holds: each backend's eager training step and KV-cache decoding at
    batch 1 (ms per token), cuTile's step speedup (torch's time over cuTile's: above 1, cuTile is faster), and
    when profiled each backend's kernel time per step and MFU. Every row, with its device and versions, goes
    to the records file (and MLflow)."""
    out: dict = {}
    for name, case, implementation, batch, field in HEADLINE:
        row = first_row(records, case, implementation, batch)
        if row is not None and field in row:
            out[name] = row[field]
    if "torch_step_ms" in out and "cutile_step_ms" in out:
        out["cutile_speedup"] = out["torch_step_ms"] / out["cutile_step_ms"]
    for backend, table in (profiles or {}).items():
        for name, field in (("kernel_ms", "total_ms"), ("mfu", "mfu")):
            if field in table:
                out[f"{backend}_{name}"] = table[field]
    return out
