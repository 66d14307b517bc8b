"""Decoding and prefill of each backend on a preset's model dims with random weights: the comparison the decode
kernels are measured by, in one run, without a corpus or a checkpoint (the weights do not change the time).

    python -m gptcore.bench.decode --preset shakespeare_char gpt2_small --json decode.json --csv decode.csv
    python -m gptcore.bench.decode --preset gpt2_small --batches 1 --tokens-per-graph 1 8 32

The rows are the bench stage's inference rows (gptcore.bench.model.inference_rows): prefill of a full block, and
decoding from the preset's bench.prompt_tokens for bench.decode_tokens tokens with the KV cache (eager, and as CUDA
graphs of `tokens_per_graph` steps) and uncached, per backend and batch size, each row within bench.row_seconds.
`--csv` appends one row per measured row with the GPU, date, versions and commit, for results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gptcore.bench import model as model_bench
from gptcore.bench.steps import describe, preset_config, random_checkpoint
from gptcore.bench.timing import OK, Recorder, Timer, append_csv
from gptcore.cutile_model import BACKENDS
from gptcore.params import Params, ParamsError, with_preset

CSV_FIELDS = [
    "gpu", "date", "torch", "cuda_tile", "commit", "model", "case", "implementation", "shape", "batch",
    "tokens_per_graph", "ms", "ms_per_token", "tokens_per_sec",
]  # fmt: skip


def csv_rows(model: str, env: dict, records: list[dict]) -> list[dict]:
    base = {"gpu": env["device"], "date": env["date"], "torch": env["torch"], "cuda_tile": env["cuda_tile"]}
    base.update(commit=env["commit"], model=model)
    rows = []
    for r in records:
        if r["status"] == OK:
            figures = {k: round(r[k], 5) for k in ("ms", "ms_per_token", "tokens_per_sec") if k in r}
            rows.append({**base, **{k: r[k] for k in CSV_FIELDS if k in r and k not in base}, **figures})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["shakespeare_char"], help="the model dims: presets' names")
    ap.add_argument("--batches", nargs="+", type=int, help="decode batch sizes (default: the preset's bench's)")
    ap.add_argument("--tokens-per-graph", nargs="+", type=int, help="graph rows' steps per graph (default: bench's)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--csv", help="append the rows for results/ here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the decode comparison needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    out, failed = {}, []
    for preset in args.preset:
        try:
            config, _, _ = preset_config(preset, None)
            bench = with_preset(Params(), preset, ["bench"]).bench
        except ParamsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model = f"{preset} dims: {describe(config, 1, dtype)}"
        timer = Timer(device, bench.warmup, bench.repeats, bench.min_repeat_ms, bench.row_seconds)
        rec = Recorder(device, timer)
        print(f"decode on {rec.env['device']} (torch {rec.env['torch']}, cuda-tile {rec.env['cuda_tile']}): {model}")
        t0 = time.perf_counter()
        for steps in args.tokens_per_graph or [bench.tokens_per_graph]:
            model_bench.inference_rows(
                rec, random_checkpoint(config), dtype, args.backends, args.batches or bench.decode_batch_sizes,
                bench.prompt_tokens, True, bench.uncached_tokens, bench.decode_tokens, steps,
            )  # fmt: skip
        print(f"{preset}: {len(rec.records)} rows in {time.perf_counter() - t0:.0f} s")
        out[preset] = {"model": model, "environment": rec.env, "records": rec.records}
        failed += [r for r in rec.records if r["status"] == "failed"]
        if args.csv:
            append_csv(args.csv, CSV_FIELDS, csv_rows(model, rec.env, rec.records))
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    for r in failed:
        print(f"{r['implementation']} {r['shape']}: failed: {r['reason']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
