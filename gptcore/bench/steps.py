"""The training step of each backend in each mode a user can pick, on a preset's model dims with random weights,
and where one eager step's kernel time goes: the comparison the fused step is measured by, in one run.

    python -m gptcore.bench.steps --preset shakespeare_char --profile --json steps.json --csv steps.csv
    python -m gptcore.bench.steps --preset gpt2_small --modes graph reduce-overhead
    python -m gptcore.bench.steps --preset gpt2_small --vocab 65 --accum 1 --modes graph

Modes: eager, compile (torch.compile's default), reduce-overhead (torch.compile with its CUDA graphs) and graph
(`train.cuda_graph`: the whole step captured as one CUDA graph); each row is the step the train stage runs
(gptcore.bench.model.train_step: forward and loss under autocast for each of the preset's micro-batches, backward,
clipping, AdamW), timed by the
bench's one timer. The data does not change the time, so no corpus or checkpoint is needed: the weights are
the model's initialisation. `--profile`: each backend's eager step by kernel category
(gptcore.bench.profile). `--csv` appends one row per measured step and per profile category, with the GPU,
date, versions and commit, for results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gptcore.bench import model as model_bench
from gptcore.bench import profile
from gptcore.bench.timing import OK, Recorder, Timer, append_csv
from gptcore.cutile_model import BACKENDS
from gptcore.devices import dtype_name
from gptcore.model import GPT, GPTConfig
from gptcore.params import Params, ParamsError, with_preset
from gptcore.train import model_config

MODES = {  # mode -> (use_compile, graph)
    "eager": (False, False),
    "compile": (True, False),
    "reduce-overhead": ("reduce-overhead", False),
    "graph": (False, True),
}
CSV_FIELDS = ["gpu", "date", "torch", "cuda_tile", "commit", "model", "backend", "what", "ms", "share", "kernels"]


CHAR_VOCAB = 65  # nanoGPT's shakespeare_char vocabulary: the char presets' rows unless --vocab says otherwise


def preset_config(name: str, vocab: int | None) -> tuple[GPTConfig, int, int]:
    """The preset's model dims (its vocabulary replaced by `vocab` when given), micro-batch and micro-batches per
    step."""
    params = with_preset(Params(), name, ["data", "model", "train"])
    if vocab is None:
        vocab = params.data.vocab_size if params.data.tokenizer == "bpe" else CHAR_VOCAB
    return model_config(params, vocab), params.train.batch_size, params.train.gradient_accumulation_steps


def random_checkpoint(config: GPTConfig, seed: int = 0) -> dict:
    """A checkpoint dict of the model's initial weights, as the bench's train step takes one."""
    torch.manual_seed(seed)
    return {"model_args": config.to_dict(), "model": GPT(config).state_dict()}


def describe(config: GPTConfig, batch: int, dtype: torch.dtype, accum: int = 1) -> str:
    c = config
    micro = f"{accum} x " if accum > 1 else ""
    return (
        f"{micro}B{batch} T{c.block_size} {c.n_layer}x{c.n_embd} H{c.n_head} V{c.vocab_size} dropout {c.dropout:g} "
        f"{dtype_name(dtype)}"
    )


def step_rows(rec: Recorder, checkpoint: dict, batch: int, dtype, backends, modes, accum: int = 1) -> None:
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    tokens = accum * batch * config.block_size
    for backend in backends:
        for mode in modes:
            use_compile, graph = MODES[mode]
            rec.measure(
                "train_step",
                f"{backend} {mode}",
                f"{accum}xB{batch}xT{config.block_size}" if accum > 1 else f"B{batch}xT{config.block_size}",
                dtype_name(dtype),
                lambda b=backend, c=use_compile, g=graph: model_bench.train_step(
                    checkpoint, b, rec.device, dtype, batch, c, g, micro_steps=accum
                ),
                lambda ms: {"tokens_per_sec": tokens / ms * 1000},
                backend=backend,
                mode=mode,
            )


def csv_rows(model: str, env: dict, records: list[dict], profiles: dict) -> list[dict]:
    base = {"gpu": env["device"], "date": env["date"], "torch": env["torch"], "cuda_tile": env["cuda_tile"]}
    base.update(commit=env["commit"], model=model)
    rows = []
    for r in records:
        if r["status"] == OK:
            rows.append({**base, "backend": r["backend"], "what": f"step {r['mode']}", "ms": round(r["ms"], 4)})
    for backend, table in profiles.items():
        for name, c in table.get("categories", {}).items():
            rows.append(
                {**base, "backend": backend, "what": f"profile {name}", "ms": round(c["ms"], 4)}
                | {"share": round(c["share"], 4), "kernels": round(c["kernels"])}
            )
        if "total_ms" in table:
            rows.append(
                {**base, "backend": backend, "what": "profile total", "ms": round(table["total_ms"], 4)}
                | {"kernels": round(table["kernels"])}
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare_char", help="the model dims and batch: a preset's name")
    ap.add_argument("--vocab", type=int, help="replace the preset's vocabulary size (GPT-2 dims with 65 chars)")
    ap.add_argument("--batch", type=int, help="micro-batch size (default: the preset's train.batch_size)")
    ap.add_argument(
        "--accum", type=int, help="micro-batches per step (default: the preset's train.gradient_accumulation_steps)"
    )
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--profile", action="store_true", help="also each backend's eager step by kernel category")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the records and profiles (every kernel) here")
    ap.add_argument("--csv", help="append the rows for results/ here")
    args = ap.parse_args(argv)
    try:
        config, preset_batch, preset_accum = preset_config(args.preset, args.vocab)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the training-step comparison needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    batch, accum = args.batch or preset_batch, args.accum or preset_accum
    checkpoint = random_checkpoint(config)
    model = f"{args.preset} dims: {describe(config, batch, dtype, accum)}"
    rec = Recorder(device, Timer(device, warmup=3, repeats=args.repeats, min_repeat_ms=20.0))
    print(f"train step on {rec.env['device']} (torch {rec.env['torch']}, cuda-tile {rec.env['cuda_tile']}): {model}")
    step_rows(rec, checkpoint, batch, dtype, args.backends, args.modes, accum)
    profiles = {}
    if args.profile:
        profiles = model_bench.step_profiles(checkpoint, batch, dtype, args.backends, device, rec.env["device"])
        for backend, table in profiles.items():
            print(table.get("skipped") or profile.format_table(backend, table))
    failed = [r for r in rec.records if r["status"] != OK]
    if args.json:
        out = {"model": model, "environment": rec.env, "records": rec.records, "profiles": profiles}
        Path(args.json).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    if args.csv:
        append_csv(args.csv, CSV_FIELDS, csv_rows(model, rec.env, rec.records, profiles))
    for r in failed:
        print(f"{r['implementation']}: {r['status']}: {r['reason']}", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
