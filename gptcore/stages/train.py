"""Train stage: train the GPT on the prepared data; keep the best-val checkpoint and its manifest
(out/ckpt.json: sha256, MLflow run, git commit, config, vocabulary, data; see gptcore/manifest.py); log to
MLflow, the checkpoint as the run's logged model (its path and sha256; the weights stay DVC's).

    python -m gptcore train [--set train.max_iters=100]       # one process
    torchrun --nproc_per_node=2 -m stages.train              # data-parallel (NCCL on GPUs, gloo on CPU)

Everything that can be checked (params, data, backend, the resume state) is checked before anything is
written. The run's best checkpoint replaces out/ckpt.pt, with its manifest, metrics and plots (the loss CSV
and its picture, plots/loss.png), only when the run ends: a failed or interrupted run leaves the previous ones
as they were (out/last.pt, the resume state, is written at every evaluation). One train runs in a folder at a
time: a second is refused, naming the first (stage.workspace_lock); a run starts by removing what a killed
one left half-done.
"""

from pathlib import Path

import yaml

from gptcore import data, plots, stage
from gptcore.files import sha256_file
from gptcore.manifest import write_manifest
from gptcore.train import Dist, Trainer, init_distributed, shutdown_distributed

SECTION = "train"
SECTIONS = ["data", "model", "train"]
LOSS_CSV = Path("plots") / "train_loss.csv"
LOSS_PNG = Path("plots") / "loss.png"
MODEL_TYPE = "gpt2"  # the logged model's type in MLflow: what its weights are, for searching and comparing


def dvc_artifact(root: Path, path: str) -> str | None:
    """The name of the artifact that <root>/dvc.yaml declares at `path` (out/ckpt.pt: gptcore-char), or None
    (no dvc.yaml here, or none declared there)."""
    try:
        declared = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")).get("artifacts") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return next((name for name, a in declared.items() if isinstance(a, dict) and a.get("path") == path), None)


def log_checkpoint_model(run, root: Path, manifest: dict, result) -> None:
    """The new best checkpoint as the run's logged model: its path, sha256 and DVC artifact, never its bytes
    (DVC keeps those), and best_val_loss at the iteration it was saved."""
    path, sha256 = manifest["path"], manifest["sha256"]
    manifest_file = Path(path).with_suffix(".json").as_posix()
    artifact = dvc_artifact(root, path)
    kept = f"the DVC artifact {artifact} (dvc artifacts get REPO {artifact})" if artifact else "DVC"
    tags = {
        "checkpoint.path": path,
        "checkpoint.sha256": sha256,
        "checkpoint.bytes": manifest["bytes"],
        "checkpoint.manifest": manifest_file,
        "git.commit": manifest["git_commit"],
        # the description MLflow's UI shows on the model's page
        "mlflow.note.content": f"The best checkpoint (iteration {result.best_iter}) of this train run: {path}, "
        f"sha256 {sha256}, kept by {kept}; its manifest is {manifest_file}.",
    }
    if artifact:
        tags["dvc.artifact"] = artifact
    if manifest.get("dvc_exp_name"):
        tags["dvc.exp_name"] = manifest["dvc_exp_name"]
    params = {
        **manifest["model_config"],
        "n_params": result.n_params,
        "corpus": manifest["data"]["corpus"],
        "tokenizer": manifest["data"]["tokenizer"],
    }
    run.log_model(
        artifact or Path(path).stem,
        step=result.best_iter,
        params=params,
        tags=tags,
        metrics={"best_val_loss": result.best_val_loss},
        model_type=MODEL_TYPE,
    )


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

            # train_loss (this iteration's), lr and tokens/s every log interval; at evaluations the val loss
            # and the train loss measured the same way (eval_train_loss: over eval_iters batches)
            def on_log(it, loss, lr, tokens_per_sec):
                run.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec}, step=it)

            def on_eval(it, losses, lr):
                run.log_metrics({"val_loss": losses["val"], "eval_train_loss": losses["train"]}, step=it)

            result = trainer.run(on_eval=on_eval, on_log=on_log)
            ckpt_file = Path(result.checkpoint).resolve()
            ckpt_rel = ckpt_file.relative_to(root).as_posix() if ckpt_file.is_relative_to(root) else str(ckpt_file)
            manifest = None
            if trainer.improved:  # a new ckpt.pt: its manifest (sha256, size, this run, the commit, what made it)
                manifest = write_manifest(
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
            stage.write_plot(root / LOSS_CSV, result.history)
            plots.write_loss_curve(root / LOSS_CSV, root / LOSS_PNG)
            run.set_tags(
                {
                    "checkpoint.sha256": manifest["sha256"] if manifest else sha256_file(ckpt_file),
                    "checkpoint.path": ckpt_rel,
                    "train.device": result.device,
                    "train.dtype": result.dtype,
                    "train.world_size": result.world_size,
                    "data.sha256": trainer.data_sha256,
                }
            )
            # The run's figures at its last iteration; best_val_loss at the best one, with the checkpoint saved there
            summary = {k: v for k, v in metrics.items() if k != "best_val_loss"}
            run.log_metrics(summary, step=result.iterations)
            if manifest:
                log_checkpoint_model(run, root, manifest, result)
            else:  # a resumed run that found no better checkpoint: ckpt.pt is still the earlier run's model
                run.log_metrics({"best_val_loss": result.best_val_loss}, step=result.best_iter)
            run.log_artifact(ckpt_file.with_suffix(".json"))
            run.log_artifact(root / LOSS_PNG)
        return 0
    finally:
        shutdown_distributed()
