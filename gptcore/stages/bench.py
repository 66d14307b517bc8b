"""Bench stage: time the cuTile model and kernels against PyTorch on this machine. Writes
metrics/bench.json (a few headline figures), bench/records.json (every row, with the device and
versions), plots/bench.csv (speed relative to the PyTorch reference) and its chart plots/bench.png, and MLflow
metrics.

    python -m gptcore bench                                     # as `dvc repro` runs it
    GPTCORE_MLFLOW=off python -m gptcore bench --preset shakespeare_char --checkpoint out/ckpt.pt
    python -m gptcore bench --cases inference --backends torch --set 'decode_batch_sizes=[1]'
    python -m gptcore bench --profile    # only where a training step's kernel time goes, per backend

Rows that cannot run here (cuTile without a GPU, an SDPA backend this device lacks) are recorded as
`skipped` with the reason. A row that fails is recorded as `failed`; the stage then exits with status 1
after writing everything, so a broken kernel cannot pass unnoticed. A row measured while another gptcore
stage ran on this machine, or while other processes kept its CPUs busy, says so (`disturbed`, and a warning
naming what ran: gptcore/neighbours.py).
"""

import re
import sys
from pathlib import Path

from gptcore import neighbours, plots, stage
from gptcore.bench import kernels as kernel_bench
from gptcore.bench import model as model_bench
from gptcore.bench.profile import format_table
from gptcore.bench.timing import FAILED, OK, Recorder, Timer, add_speedups, plot_rows, record_id
from gptcore.checkpoint import load_checkpoint
from gptcore.devices import resolve_device, resolve_dtype
from gptcore.manifest import checkpoint_tags
from gptcore.model import GPTConfig
from gptcore.params import BenchParams

SECTION = "bench"
PLOT = Path("plots") / "bench.csv"
CHART = Path("plots") / "bench.png"
RECORDS = Path("bench") / "records.json"


def metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)  # the characters MLflow allows in a metric name


def parse_args(argv):
    ap = stage.parser(__doc__, SECTION, "python -m gptcore bench")
    ap.add_argument("--checkpoint", help="bench.checkpoint: the trained model whose config sets the shapes")
    ap.add_argument("--device", help="bench.device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--cases", nargs="+", help="bench.cases: kernels train inference")
    ap.add_argument("--backends", nargs="+", help="bench.backends: torch cutile")
    ap.add_argument("--repeats", type=int, help="bench.repeats")
    ap.add_argument("--profile", action="store_true", help="only the training step's profile: --cases profile")
    args = ap.parse_args(argv)
    if args.profile:
        if args.cases:
            ap.error("--profile is --cases profile: give one or the other")
        args.cases = ["profile"]
    return args


def run_cases(rec: Recorder, p: BenchParams, checkpoint: dict, config: GPTConfig, device, dtype) -> dict:
    """Every row of the cases asked for into `rec`; returns the profiles (by backend) when one was asked for."""
    if "kernels" in p.cases:
        kernel_dtypes = list(dict.fromkeys(resolve_dtype(d, device) for d in p.kernel_dtypes))
        kernel_bench.kernel_rows(
            rec, config, p.kernel_shapes, p.model_batch, p.gpt2_batch, kernel_dtypes, dropout_p=config.dropout
        )
    if "train" in p.cases:
        model_bench.train_step_rows(rec, checkpoint, p.model_batch, dtype, p.backends, p.compile)
    if "inference" in p.cases:
        model_bench.inference_rows(
            rec,
            checkpoint,
            dtype,
            p.backends,
            p.decode_batch_sizes,
            p.prompt_tokens,
            p.cuda_graph,
            p.uncached_tokens,
            p.decode_tokens,
            p.tokens_per_graph,
        )
    profiles = {}
    if "profile" in p.cases:
        name = rec.env["device"]
        profiles = model_bench.step_profiles(checkpoint, p.model_batch, dtype, p.backends, device, name)
        for backend, table in profiles.items():
            skipped = table.get("skipped")
            print(f"{backend}: not profiled: {skipped}" if skipped else format_table(backend, table))
    return profiles


def mlflow_figures(records: list[dict]) -> dict:
    """Every measured row's figures as MLflow metrics, named by the row."""
    figures = {}
    for r in records:
        if r["status"] != OK:
            continue
        for key in ("ms", "ms_per_token", "tflops", "gbps", "tokens_per_sec", "speedup", "speedup_vs_uncached"):
            if key in r:
                figures[metric_name(f"{record_id(r)}/{key}")] = r[key]
    return figures


def report(records: list[dict], path: Path) -> int:
    """The summary on the console; 1 when a row failed (listed on stderr), else 0."""
    counts = model_bench.row_counts(records)
    print(
        f"bench: {counts['ok']} measured, {counts['skipped']} skipped, {counts['failed']} failed -> "
        f"{path}, {RECORDS}, {PLOT}, {CHART}"
    )
    for backend in ("torch", "cutile"):
        row = model_bench.first_row(records, "decode", f"{backend} kv_cache", batch=1)
        decode = (row or {}).get("speedup_vs_uncached")
        if decode:
            print(f"  decode batch 1, {backend} kv_cache: {decode:.2f}x the tokens/s of uncached regeneration")
    for line in neighbours.warnings(records):
        print(line, file=sys.stderr)
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        print("failed rows:\n" + "\n".join(f"  {record_id(r)}: {r['reason']}" for r in failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = {k: getattr(args, k) for k in ("checkpoint", "device", "cases", "backends", "repeats")}
    params = stage.load(args, SECTION, flags)
    p = params.bench
    root = stage.workspace()
    device = resolve_device(p.device, "bench.device")
    dtype = resolve_dtype(p.dtype, device)
    ckpt_path = root / p.checkpoint
    checkpoint = load_checkpoint(ckpt_path)  # checked against its manifest (out/ckpt.json) when it has one
    ckpt_tags = checkpoint_tags(ckpt_path)
    config = GPTConfig.from_dict(dict(checkpoint["model_args"]))
    rec = Recorder(device, Timer(device, p.warmup, p.repeats, p.min_repeat_ms, p.row_seconds), watch=neighbours.Watch())
    print(
        f"bench on {rec.env['device']} (torch {rec.env['torch']}, cuda-tile {rec.env['cuda_tile']}); model "
        f"{config.n_layer}L {config.n_head}H {config.n_embd}d block {config.block_size} from {p.checkpoint}"
    )
    with stage.tracked("bench", params, [SECTION]) as run:
        profiles = run_cases(rec, p, checkpoint, config, device, dtype)
        records = rec.records
        add_speedups(records, {**kernel_bench.REFERENCE, **model_bench.REFERENCE})
        headline = model_bench.headline_metrics(records, profiles)
        headline["disturbed_rows"] = neighbours.disturbed_rows(records)  # measured while other work ran
        stage.write_json(
            root / RECORDS,
            {
                "environment": rec.env,
                "model": config.to_dict(),
                "checkpoint": p.checkpoint,
                "mlflow_run_id": run.run_id,
                "records": {record_id(r): r for r in records},
                "profiles": profiles,
            },
        )
        path = stage.write_metrics("bench", headline, root)
        stage.write_plot(root / PLOT, plot_rows(records))
        plots.write_speed_chart(root / PLOT, root / CHART)
        counts = model_bench.row_counts(records)
        counts["disturbed"] = headline["disturbed_rows"]
        run.log_metrics({**mlflow_figures(records), **{f"rows_{k}": v for k, v in counts.items()}})
        run.set_tags(
            {
                "bench.device": rec.env["device"],
                "bench.torch": rec.env["torch"],
                "bench.cuda_tile": rec.env["cuda_tile"],
                **ckpt_tags,
            }
        )
        run.log_artifact(path)
        run.log_artifact(root / RECORDS)
        run.log_artifact(root / CHART)
    return report(records, path.relative_to(root))
