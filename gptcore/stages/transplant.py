"""Transplant stage: check a checkpoint and write the cuTile model's weights (safetensors + manifest).

    python -m gptcore transplant [--params params.yaml] [--set transplant.dtype=bfloat16]

The source is `transplant.source` (default: the train stage's out/ckpt.pt; a karpathy/nanoGPT ckpt.pt
works too). Any failed check stops the stage with a message naming the file and what is wrong.
"""

from gptcore import data, stage
from gptcore.manifest import checkpoint_tags
from gptcore.tokenizer import load as load_tokenizer
from gptcore.transplant import MANIFEST_FILE, transplant

SECTION = "transplant"


def parse_args(argv):
    return stage.parser(__doc__, SECTION, "python -m gptcore transplant").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args, SECTION)
    root = stage.workspace()
    p = params.transplant
    data_dir = root / params.data.out_dir
    tokenizer = load_tokenizer(data_dir)
    record = data.data_record(params.data, data_dir)  # in the manifest, for re-verifying a fetched copy
    with stage.tracked("transplant", params, [SECTION]) as run:
        # Paths in the manifest are relative to the workspace, so it reads the same wherever the repo lives.
        provenance = {"mlflow_run_id": run.run_id, "git_commit": run.tags["git.commit"], "dvc_stage": "transplant"}
        manifest = transplant(
            root / p.source,
            root / p.out_dir,
            tokenizer.vocab_size,
            p.dtype,
            vocab_source=f"{params.data.out_dir}/tokenizer.json",
            source_label=p.source,
            provenance=provenance,
            data=record,
            tokenizer=tokenizer.to_json(),  # a source without its own (nanoGPT's) gets the data's
        )
        metrics = {
            "n_params": manifest["n_params"],
            "weights_bytes": manifest["weights"]["bytes"],
            "checks_passed": sum(c["status"] == "pass" for c in manifest["checks"]),
            "checks_skipped": sum(c["status"] == "skipped" for c in manifest["checks"]),
            "seconds": manifest["seconds"],
        }
        for key in ("iter_num", "best_val_loss"):
            if key in manifest["source"]:
                metrics[f"source_{key}"] = manifest["source"][key]
        stage.write_metrics("transplant", metrics, root)
        run.set_tags(
            {
                **checkpoint_tags(root / p.source, manifest["source"]["sha256"]),  # used, and the run that made it
                "weights.sha256": manifest["weights"]["sha256"],  # made
                "transplant.source_format": manifest["source"]["format"],
            }
        )
        run.log_metrics(metrics)
        run.log_artifact(root / p.out_dir / MANIFEST_FILE)
    if any(manifest.get(k) != v for k, v in provenance.items()):
        print(
            f"note: {p.out_dir}/{MANIFEST_FILE} kept as run {manifest.get('mlflow_run_id')} wrote it at "
            f"{manifest.get('created')}: these weights are byte for byte the ones it made"
        )
    checks = ", ".join(c["name"] for c in manifest["checks"])
    print(
        f"transplanted {p.source} ({manifest['source']['format']}, {manifest['n_params']:,} parameters) -> "
        f"{p.out_dir}/ as {p.dtype}; checks: {checks}"
    )
    return 0
