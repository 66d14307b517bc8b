"""Verify stage: the cuTile model against the reference, level by level (compile gate, then L1-L5).

    python stages/verify.py                       # the pipeline: <transplant.out_dir>/model.safetensors
                                                  #   -> reports/verify.md, metrics/verify.json
    python stages/verify.py --checkpoint PATH [--data DIR] [--out DIR]
        # any checkpoint (ours, a nanoGPT ckpt.pt, a transplant's safetensors or its folder), checked as the
        # transplant stage checks it; report and metrics go to DIR (default verify-runs/<name>-<sha>/),
        # never to the pipeline's outputs. --data: the prepared data to verify on (meta.json, val.bin).
    GPTCORE_MLFLOW=off python stages/verify.py --checkpoint out/ckpt.pt --preset shakespeare_char --out DIR
        # the GPU machine (no MLflow there: records go to a JSON file); --preset takes the verify section of
        # presets/NAME.yaml, --set KEY=VALUE (repeatable) any verify key, --device a device

Exit status: 0 when nothing failed (skipped levels included: they say why), 1 when the compile gate or
a level failed (after the report and metrics are written), 2 for unusable inputs (a one-line message).
"""

import json
import sys
from pathlib import Path

from gptcore import data, stage
from gptcore.files import atomic_write_text
from gptcore.manifest import checkpoint_tags
from gptcore.params import parse_assignments, repo_root, with_overrides, with_preset
from gptcore.tracking import flatten
from gptcore.transplant import WEIGHTS_FILE, check_weights
from gptcore.verify import FAIL, metrics, render, verify

REPORT = Path("reports") / "verify.md"


def main(argv=None) -> int:
    ap = stage.parser(__doc__)
    ap.add_argument("--checkpoint", help="verify this checkpoint instead of the pipeline's transplant")
    ap.add_argument("--data", help="prepared data folder (meta.json, val.bin); default: data.out_dir")
    ap.add_argument("--out", help="where --checkpoint writes verify.md and verify.json")
    ap.add_argument(
        "--preset",
        metavar="NAME",
        help="take the verify section of presets/NAME.yaml (GPU sizes) without editing params.yaml",
    )
    ap.add_argument("--device", help="verify.device: auto | cpu | cuda | cuda:N")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other verify key, value in YAML (repeatable): --set decode_tokens=500",
    )
    args = ap.parse_args(argv)
    if args.out and not args.checkpoint:
        ap.error("--out goes with --checkpoint (the pipeline writes reports/verify.md and metrics/verify.json)")
    params = stage.load(args.params)
    if args.preset:
        params = with_preset(params, args.preset, ["verify"])
    overrides = {**({"device": args.device} if args.device else {}), **parse_assignments(args.set, "verify")}
    if overrides:
        params = with_overrides(params, "verify", overrides)
    root = repo_root()
    vp = params.verify
    data_dir = Path(args.data) if args.data else root / params.data.out_dir
    vocab = data.CharVocab.load(data_dir / "meta.json")
    val = data.load_split(data_dir, "val")
    source = Path(args.checkpoint) if args.checkpoint else root / params.transplant.out_dir / WEIGHTS_FILE
    weights = check_weights(source, vocab.vocab_size, vocab_source=str(data_dir / "meta.json"))

    if args.checkpoint:  # ad hoc: a folder of its own, named after the checkpoint, never the pipeline's outputs
        name = source.name if source.is_dir() else source.stem
        out_dir = Path(args.out) if args.out else root / "verify-runs" / f"{name}-{weights.source_sha256[:8]}"
        report_path, metrics_path = out_dir / "verify.md", out_dir / "verify.json"
    else:
        report_path, metrics_path = root / REPORT, root / "metrics" / "verify.json"

    with stage.tracked("verify", params, ["verify"]) as run:
        run.set_tags(
            {
                "verify.mode": "checkpoint" if args.checkpoint else "pipeline",
                # the file verified (its sha256 was checked against its manifest, when it has one)
                # and the MLflow run and commit that made it, from that manifest
                **checkpoint_tags(weights.source, weights.source_sha256),
            }
        )
        result = verify(weights, val, vp, decode=vocab.decode)
        summary = metrics(result)
        summary["mlflow_run_id"] = run.run_id
        # Report and metrics first: a failed level must still leave them behind for reading.
        atomic_write_text(report_path, render(result))
        if args.checkpoint:
            atomic_write_text(metrics_path, json.dumps(summary, indent=2) + "\n")
        else:
            stage.write_metrics("verify", summary, root)
        run.set_tags({"verify.status": result.status, **{f"verify.{r.name}": r.status for r in result.results}})
        run.log_metrics({k: v for k, v in flatten("", summary).items() if ".tolerance." not in k})
        run.log_artifact(report_path)
        run.log_artifact(metrics_path)

    for r in result.results:
        print(f"{r.name:8s} {r.status:8s} {r.reason}")
    print(f"verify: {result.status}; report {report_path}, metrics {metrics_path}")
    return 1 if result.status == FAIL else 0


if __name__ == "__main__":
    sys.exit(stage.main(main))
