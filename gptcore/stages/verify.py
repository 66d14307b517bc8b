"""Verify stage: the cuTile model against the reference, level by level (compile gate, then L1-L5).

    python -m gptcore verify                      # the pipeline: <transplant.out_dir>/model.safetensors
                                                  #   -> reports/verify.{md,json}, metrics/verify.json
    python -m gptcore verify --checkpoint PATH [--data DIR] [--out DIR]
        # any checkpoint (ours, a nanoGPT ckpt.pt, a transplant's safetensors or its folder), checked as the
        # transplant stage checks it, from any folder; report and record go to DIR (default
        # verify-runs/<name>-<sha>/), never to the pipeline's outputs. The data: --data DIR (meta.json,
        # val.bin), else the project's prepared data when here, else the tokenizer the checkpoint carries
        # and the corpus its manifest records. Without a params.yaml here, verify's defaults.
    GPTCORE_MLFLOW=off python -m gptcore verify --checkpoint out/ckpt.pt --preset shakespeare_char --out DIR
        # the GPU machine (no MLflow there: records go to a JSON file)

Exit status: 0 when nothing failed (skipped levels included: they say why), 1 when the compile gate or
a level failed (after the report and metrics are written), 2 for unusable inputs (a one-line message).
"""

import os
from pathlib import Path

from gptcore import data, stage
from gptcore.errors import DataError
from gptcore.files import atomic_write_text
from gptcore.manifest import checkpoint_tags, find_manifest
from gptcore.tokenizer import for_checkpoint
from gptcore.tokenizer import load as load_tokenizer
from gptcore.tracking import flatten
from gptcore.transplant import WEIGHTS_FILE, check_weights
from gptcore.verify import FAIL, headline_metrics, level_metrics, metrics, render, verify

SECTION = "verify"
REPORT = Path("reports") / "verify.md"


def checked_data(args, params, root: Path, source: Path):
    """(checked weights, tokenizer, validation tokens): with prepared data (--data, or the project's), its
    tokenizer and split; without, the tokenizer the checkpoint carries and the split rebuilt from the corpus
    its manifest records."""
    project_data = root / params.data.out_dir
    if args.data or not args.checkpoint or (project_data / "meta.json").is_file():
        data_dir = Path(args.data) if args.data else project_data
        tokenizer = load_tokenizer(data_dir)
        weights = check_weights(source, tokenizer.vocab_size, vocab_source=str(data_dir / "tokenizer.json"))
        return weights, tokenizer, data.load_split(data_dir, "val")
    weights = check_weights(source, None)  # its vocabulary checked against the tokenizer it carries
    found = find_manifest(weights.source)
    if weights.tokenizer is None or found is None:
        raise DataError(
            f"{weights.source}: no prepared data here, and the checkpoint carries no tokenizer or has no manifest "
            "beside it that records its corpus: pass --data DIR, a prepared data folder (meta.json, val.bin)"
        )
    tokenizer = for_checkpoint(weights.source, weights.config.vocab_size, weights.tokenizer)
    return weights, tokenizer, data.from_record(found.data, tokenizer, str(found.path), root)


def parse_args(argv):
    ap = stage.parser(__doc__, SECTION, "python -m gptcore verify")
    ap.add_argument("--checkpoint", help="verify this checkpoint instead of the pipeline's transplant")
    ap.add_argument("--data", help="prepared data folder (meta.json, val.bin) to verify on")
    ap.add_argument("--out", help="where --checkpoint writes verify.md and verify.json")
    ap.add_argument("--device", help="verify.device: auto | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    if args.out and not args.checkpoint:
        ap.error("--out goes with --checkpoint (the pipeline writes reports/verify.md and metrics/verify.json)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    in_project = Path(args.params or stage.PARAMS_FILE).exists()
    params = stage.load(args, SECTION, {"device": args.device})
    root = stage.workspace()
    source = Path(args.checkpoint) if args.checkpoint else root / params.transplant.out_dir / WEIGHTS_FILE
    weights, tokenizer, val = checked_data(args, params, root, source)

    if args.checkpoint:  # ad hoc: a folder of its own, named after the checkpoint, never the pipeline's outputs
        name = source.name if source.is_dir() else source.stem
        out_dir = Path(args.out) if args.out else root / "verify-runs" / f"{name}-{weights.source_sha256[:8]}"
        report_path, record_path = out_dir / "verify.md", out_dir / "verify.json"
    else:
        report_path, record_path = root / REPORT, root / REPORT.with_suffix(".json")

    # Outside a project (a fetched checkpoint in a folder of its own) nothing is logged, unless asked to.
    log = in_project or not args.checkpoint or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    with stage.tracked("verify", params, [SECTION], log=log) as run:
        run.set_tags(
            {
                "verify.mode": "checkpoint" if args.checkpoint else "pipeline",
                # the file verified (its sha256 was checked against its manifest, when it has one)
                # and the MLflow run and commit that made it, from that manifest
                **checkpoint_tags(weights.source, weights.source_sha256),
            }
        )
        result = verify(weights, val, params.verify, decode=tokenizer.decode)
        record = {**metrics(result), "mlflow_run_id": run.run_id}
        headline = headline_metrics(result)
        # Report and record first: a failed level must still leave them behind for reading.
        atomic_write_text(report_path, render(result))
        stage.write_json(record_path, record)
        if not args.checkpoint:
            stage.write_metrics("verify", headline, root)
        run.set_tags({"verify.status": result.status, **{f"verify.{r.name}": r.status for r in result.results}})
        run.log_metrics(flatten("", {**headline, **level_metrics(result)}))
        run.log_artifact(report_path)
        run.log_artifact(record_path)

    for r in result.results:
        print(f"{r.name:8s} {r.status:8s} {r.reason}")
    print(f"verify: {result.status}; report {report_path}, record {record_path}")
    return 1 if result.status == FAIL else 0
