"""Bench stage: time the cuTile model and kernels against PyTorch on this machine; write metrics/bench.json
(one record per case), plots/bench.csv (speed relative to the PyTorch reference) and MLflow metrics.

    python stages/bench.py                                           # as `dvc repro` runs it
    GPTCORE_MLFLOW=off python stages/bench.py --preset shakespeare_char --checkpoint out/ckpt.pt
    python stages/bench.py --cases inference --backends torch --set decode_batch_sizes=[1]

Rows that cannot run here (cuTile without a GPU, an SDPA backend this device lacks) are recorded as
`skipped` with the reason. A row that fails is recorded as `failed`; the stage then exits with status 1
after writing everything, so a broken kernel cannot pass unnoticed.
"""

import re
import sys
from pathlib import Path

from gptcore import stage
from gptcore.bench import kernels as kernel_bench
from gptcore.bench import model as model_bench
from gptcore.bench.timing import FAILED, OK, SKIPPED, Recorder, Timer, add_speedups, plot_rows, record_id
from gptcore.checkpoint import load_checkpoint
from gptcore.devices import resolve_device, resolve_dtype
from gptcore.manifest import checkpoint_tags
from gptcore.model import GPTConfig
from gptcore.params import parse_assignments, repo_root, with_overrides, with_preset

SECTIONS = ["bench"]
PLOT = Path("plots") / "bench.csv"


def parse_args(argv):
    ap = stage.parser(__doc__)
    ap.add_argument(
        "--preset",
        metavar="NAME",
        help="take the bench section of presets/NAME.yaml (GPU sizes) without editing params.yaml",
    )
    ap.add_argument("--checkpoint", help="bench.checkpoint: the trained model whose config sets the shapes")
    ap.add_argument("--device", help="bench.device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--cases", nargs="+", help="bench.cases: kernels train inference")
    ap.add_argument("--backends", nargs="+", help="bench.backends: torch cutile")
    ap.add_argument("--repeats", type=int, help="bench.repeats")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other bench key, value in YAML (repeatable): --set kernel_dtypes=[bfloat16]",
    )
    return ap.parse_args(argv)


def metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)  # the characters MLflow allows in a metric name


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args.params)
    if args.preset:
        params = with_preset(params, args.preset, SECTIONS)
    flags = {
        "checkpoint": args.checkpoint,
        "device": args.device,
        "cases": args.cases,
        "backends": args.backends,
        "repeats": args.repeats,
    }
    params = with_overrides(
        params, "bench", {**{k: v for k, v in flags.items() if v is not None}, **parse_assignments(args.set, "bench")}
    )
    p = params.bench
    root = repo_root()
    device = resolve_device(p.device, "bench.device")
    dtype = resolve_dtype(p.dtype, device)
    kernel_dtypes = list(dict.fromkeys(resolve_dtype(d, device) for d in p.kernel_dtypes))
    ckpt_path = root / p.checkpoint
    checkpoint = load_checkpoint(ckpt_path)  # checked against its manifest (out/ckpt.json) when it has one
    ckpt_tags = checkpoint_tags(ckpt_path)
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))

    rec = Recorder(device, Timer(device, p.warmup, p.repeats, p.min_repeat_ms))
    print(
        f"bench on {rec.env['device']} (torch {rec.env['torch']}, cuda-tile {rec.env['cuda_tile']}); model "
        f"{config.n_layer}L {config.n_head}H {config.n_embd}d block {config.block_size} from {p.checkpoint}"
    )
    with stage.tracked("bench", params, SECTIONS) as run:
        if "kernels" in p.cases:
            kernel_bench.kernel_rows(rec, config, p.kernel_shapes, p.model_batch, p.gpt2_batch, kernel_dtypes)
        if "train" in p.cases:
            model_bench.train_step_rows(rec, checkpoint, p.model_batch, dtype, p.backends, p.compile)
        if "inference" in p.cases:
            model_bench.inference_rows(
                rec, checkpoint, dtype, p.backends, p.decode_batch_sizes, p.prompt_tokens, p.cuda_graph
            )
        records = rec.records
        add_speedups(records, {**kernel_bench.REFERENCE, **model_bench.REFERENCE})

        counts = {status: sum(r["status"] == status for r in records) for status in (OK, SKIPPED, FAILED)}
        # The headline: decode with the KV cache vs regenerating the whole context, batch 1, per backend.
        decode_b1 = {
            r["implementation"]: r["speedup_vs_uncached"]
            for r in records
            if r["case"] == "decode" and r.get("batch") == 1 and "speedup_vs_uncached" in r
        }
        metrics = {
            **rec.env,
            "checkpoint": p.checkpoint,
            "checkpoint_sha256": ckpt_tags["checkpoint.sha256"],
            "model": config.to_dict(),
            "counts": counts,
            "decode_speedup_vs_uncached_batch1": decode_b1,
            "mlflow_run_id": run.run_id,
            "records": {record_id(r): r for r in records},
        }
        path = stage.write_metrics("bench", metrics, root)
        stage.write_plot(root / PLOT, plot_rows(records))

        figures = {}
        for r in records:
            if r["status"] != OK:
                continue
            for key in ("ms", "tflops", "gbps", "tokens_per_sec", "speedup", "speedup_vs_uncached"):
                if key in r:
                    figures[metric_name(f"{record_id(r)}/{key}")] = r[key]
        run.log_metrics({**figures, **{f"rows_{k}": v for k, v in counts.items()}})
        run.set_tags(
            {
                "bench.device": rec.env["device"],
                "bench.torch": rec.env["torch"],
                "bench.cuda_tile": rec.env["cuda_tile"],
                **ckpt_tags,
            }
        )
        run.log_artifact(path)

    print(
        f"bench: {counts['ok']} measured, {counts['skipped']} skipped, {counts['failed']} failed -> "
        f"{path.relative_to(root)}, {PLOT}"
    )
    for impl, speedup in decode_b1.items():
        print(f"  decode batch 1, {impl}: {speedup:.2f}x the tokens/s of uncached regeneration")
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        print("failed rows:\n" + "\n".join(f"  {record_id(r)}: {r['reason']}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(stage.main(main))
