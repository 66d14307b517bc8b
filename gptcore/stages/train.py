"""Train stage: train the GPT on the prepared data; keep the best-val checkpoint and its manifest
(out/ckpt.json: sha256, MLflow run, git commit, config, vocabulary, data; see gptcore/manifest.py); log to MLflow.

    python -m gptcore train [--set train.max_iters=100]       # one process
    torchrun --nproc_per_node=2 -m stages.train              # data-parallel (NCCL on GPUs, gloo on CPU)

Everything that can be checked (params, data, backend, the resume state) is checked before anything is
written. The run's best checkpoint replaces out/ckpt.pt, with its manifest, metrics and plot, only when the
run ends: a failed or interrupted run leaves the previous ones as they were (out/last.pt, the resume
state, is written at every evaluation). One train runs in a folder at a time: a second is refused, naming
the first (stage.workspace_lock); a run starts by removing what a killed one left half-done.
"""

from pathlib import Path

from gptcore import data, stage
from gptcore.files import sha256_file
from gptcore.manifest import write_manifest
from gptcore.train import Dist, Trainer, init_distributed, shutdown_distributed

SECTION = "train"
SECTIONS = ["data", "model", "train"]


def parse_args(argv):
    return stage.parser(__doc__, SECTION, "python -m gptcore train").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args, SECTION, sections=SECTIONS)
    root = stage.workspace()
    d = Dist.from_env()
    init_distributed(d)
    try:
        trainer = Trainer(params, root, d)
        if not d.master:
            trainer.run()
            return 0
        with stage.tracked("train", params, SECTIONS) as run:
            trainer.run_id = run.run_id
            if trainer.resumed_run_id:
                run.set_tags({"resumed_from": trainer.resumed_run_id})

            def on_eval(it, losses, lr):
                run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"], "lr": lr}, step=it)

            result = trainer.run(on_eval=on_eval)
            ckpt_file = Path(result.checkpoint).resolve()
            ckpt_rel = ckpt_file.relative_to(root).as_posix() if ckpt_file.is_relative_to(root) else str(ckpt_file)
            if trainer.improved:  # a new ckpt.pt: its manifest (sha256, size, this run, the commit, what made it)
                write_manifest(
                    ckpt_file,
                    dvc_stage="train",
                    mlflow_run_id=run.run_id,
                    git_commit=run.tags["git.commit"],
                    path=ckpt_rel,
                    mlflow_experiment=params.mlflow.experiment,
                    model_config=trainer.config.to_dict(),
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
                    **data.data_record(params.data, root / params.data.out_dir),
                )
            metrics = {
                "best_val_loss": result.best_val_loss,
                "best_iter": result.best_iter,
                "iterations": result.iterations,
                "final_train_loss": result.history[-1]["train_loss"],
                "final_val_loss": result.history[-1]["val_loss"],
                "tokens_per_sec": result.tokens_per_sec,
                "ms_per_iter": result.ms_per_iter,
                "n_params": result.n_params,
            }
            stage.write_metrics("train", metrics, root)
            stage.write_plot(root / "plots" / "train_loss.csv", result.history)
            run.set_tags(
                {
                    "checkpoint.sha256": sha256_file(ckpt_file),
                    "checkpoint.path": ckpt_rel,
                    "train.device": result.device,
                    "train.dtype": result.dtype,
                    "train.world_size": result.world_size,
                    "data.sha256": trainer.data_sha256,
                }
            )
            run.log_metrics(metrics)
            run.log_artifact(ckpt_file.with_suffix(".json"))
        return 0
    finally:
        shutdown_distributed()
