"""Transplant stage: check a checkpoint and write the cuTile model's weights (safetensors + manifest).

    python stages/transplant.py [--params params.yaml]

The source is `transplant.source` (default: the train stage's out/ckpt.pt; a karpathy/nanoGPT ckpt.pt
works too). Any failed check stops the stage with a message naming the file and what is wrong.
"""

import sys

from gptcore import data, stage
from gptcore.manifest import checkpoint_tags
from gptcore.params import repo_root
from gptcore.transplant import MANIFEST_FILE, transplant


def main(argv=None) -> int:
    ap = stage.parser(__doc__)
    args = ap.parse_args(argv)
    params = stage.load(args.params)
    root = repo_root()
    p = params.transplant
    meta = root / params.data.out_dir / "meta.json"
    vocab = data.CharVocab.load(meta)
    with stage.tracked("transplant", params, ["transplant"]) as run:
        # Paths in the manifest are relative to the repo, so it reads the same wherever the repo lives.
        manifest = transplant(
            root / p.source,
            root / p.out_dir,
            vocab.vocab_size,
            p.dtype,
            vocab_source=f"{params.data.out_dir}/meta.json",
            source_label=p.source,
            provenance={"mlflow_run_id": run.run_id, "git_commit": run.tags["git.commit"], "dvc_stage": "transplant"},
        )
        metrics = {
            "n_params": manifest["n_params"],
            "dtype": p.dtype,
            "source_format": manifest["source"]["format"],
            "source_sha256": manifest["source"]["sha256"],
            "weights_sha256": manifest["weights"]["sha256"],
            "weights_bytes": manifest["weights"]["bytes"],
            "checks_passed": sum(c["status"] == "pass" for c in manifest["checks"]),
            "checks_skipped": sum(c["status"] == "skipped" for c in manifest["checks"]),
            "seconds": manifest["seconds"],
            "mlflow_run_id": run.run_id,
        }
        for key in ("iter_num", "best_val_loss"):
            if key in manifest["source"]:
                metrics[f"source_{key}"] = manifest["source"][key]
        stage.write_metrics("transplant", metrics, root)
        run.set_tags(
            {
                **checkpoint_tags(root / p.source, metrics["source_sha256"]),  # used; + the run that made it
                "weights.sha256": metrics["weights_sha256"],
            }
        )  # made
        run.log_metrics(metrics)
        run.log_artifact(root / p.out_dir / MANIFEST_FILE)
    print(
        f"transplanted {p.source} ({manifest['source']['format']}, {manifest['n_params']:,} parameters) -> "
        f"{p.out_dir}/ as {p.dtype}; checks: " + ", ".join(c["name"] for c in manifest["checks"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(stage.main(main))
