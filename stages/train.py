"""Train stage: train the GPT on the prepared data; keep the best-val checkpoint; log to MLflow.

    python stages/train.py                                    # one process
    torchrun --nproc_per_node=2 stages/train.py               # data-parallel (NCCL on GPUs, gloo on CPU)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptcore import stage  # noqa: E402
from gptcore.checkpoint import sha256_file  # noqa: E402
from gptcore.params import repo_root  # noqa: E402
from gptcore.train import Dist, Trainer, init_distributed, shutdown_distributed  # noqa: E402

SECTIONS = ["data", "model", "train"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
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
        with stage.tracked("train", params, SECTIONS) as run:
            def on_eval(it, losses, lr):
                run.log_metrics({"train_loss": losses["train"], "val_loss": losses["val"], "lr": lr}, step=it)

            result = trainer.run(on_eval=on_eval)
            ckpt_sha = sha256_file(result.checkpoint)
            metrics = {
                "best_val_loss": result.best_val_loss, "best_iter": result.best_iter,
                "iterations": result.iterations, "tokens_per_sec": result.tokens_per_sec,
                "ms_per_iter": result.ms_per_iter, "n_params": result.n_params,
                "world_size": result.world_size, "device": result.device, "dtype": result.dtype,
                "backend": params.train.backend, "compile": params.train.compile,
                "final_train_loss": result.history[-1]["train_loss"],
                "final_val_loss": result.history[-1]["val_loss"],
                "checkpoint_sha256": ckpt_sha, "mlflow_run_id": run.run_id,
            }
            stage.write_metrics("train", metrics, root)
            stage.write_plot(root / "plots" / "train_loss.csv", result.history)
            run.set_tags({"checkpoint.sha256": ckpt_sha})
            run.log_metrics(metrics)
        return 0
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(stage.main(main))
