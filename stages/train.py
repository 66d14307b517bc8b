"""Train stage: train the GPT on the prepared data; keep the best-val checkpoint and its manifest
(out/ckpt.json: sha256, MLflow run, git commit, config, data, loss; see gptcore/manifest.py); log to MLflow.

    python stages/train.py                                    # one process
    torchrun --nproc_per_node=2 stages/train.py               # data-parallel (NCCL on GPUs, gloo on CPU)
"""

import sys
from pathlib import Path

from gptcore import stage
from gptcore.manifest import manifest_path, write_manifest
from gptcore.params import repo_root
from gptcore.train import BEST_CHECKPOINT, Dist, Trainer, init_distributed, model_config, shutdown_distributed

SECTIONS = ["data", "model", "train"]


def main(argv=None) -> int:
    ap = stage.parser(__doc__)
    args = ap.parse_args(argv)
    params = stage.load(args.params)
    root = repo_root()
    d = Dist.from_env()
    init_distributed(d)
    try:
        trainer = Trainer(params, root, d)
        if not d.master:
            trainer.run()
            return 0
        # A manifest left by an earlier run describes a checkpoint this run is about to replace: remove it
        # now, so an interrupted run leaves no manifest that vouches for other bytes. Written again below.
        manifest_path(trainer.out_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
        with stage.tracked("train", params, SECTIONS) as run:

            def on_eval(it, losses, lr):
                run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"], "lr": lr}, step=it)

            result = trainer.run(on_eval=on_eval)
            # The manifest beside the checkpoint: its sha256 and size, this run, the commit, what made it.
            ckpt_file = Path(result.checkpoint).resolve()
            ckpt_rel = ckpt_file.relative_to(root).as_posix() if ckpt_file.is_relative_to(root) else str(ckpt_file)
            manifest = write_manifest(
                ckpt_file,
                dvc_stage="train",
                mlflow_run_id=run.run_id,
                git_commit=run.tags["git.commit"],
                path=ckpt_rel,
                mlflow_experiment=params.mlflow.experiment,
                model_config=model_config(params, trainer.vocab.vocab_size).to_dict(),
                n_params=result.n_params,
                data_sha256=trainer.data_sha256,
                best_val_loss=result.best_val_loss,
                iteration=result.best_iter,
                iterations=result.iterations,
                backend=params.train.backend,
                device=result.device,
                dtype=result.dtype,
                world_size=result.world_size,
                params={k: getattr(params, k).model_dump() for k in SECTIONS},
            )
            ckpt_sha = manifest["sha256"]
            metrics = {
                "best_val_loss": result.best_val_loss,
                "best_iter": result.best_iter,
                "iterations": result.iterations,
                "tokens_per_sec": result.tokens_per_sec,
                "ms_per_iter": result.ms_per_iter,
                "n_params": result.n_params,
                "world_size": result.world_size,
                "device": result.device,
                "dtype": result.dtype,
                "backend": params.train.backend,
                "compile": params.train.compile,
                "cuda_graph": params.train.cuda_graph,
                "final_train_loss": result.history[-1]["train_loss"],
                "final_val_loss": result.history[-1]["val_loss"],
                "checkpoint_sha256": ckpt_sha,
                "mlflow_run_id": run.run_id,
            }
            stage.write_metrics("train", metrics, root)
            stage.write_plot(root / "plots" / "train_loss.csv", result.history)
            run.set_tags({"checkpoint.sha256": ckpt_sha, "checkpoint.path": ckpt_rel})
            run.log_metrics(metrics)
            run.log_artifact(manifest_path(result.checkpoint))
        return 0
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(stage.main(main))
