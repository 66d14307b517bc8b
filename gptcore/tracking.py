"""MLflow logging shared by every stage: one run per stage execution, tagged so it can be traced back.

The store defaults to `sqlite:///<repo root>/mlflow.db`, the root taken from DVC_ROOT when DVC runs the
stage, so `dvc exp run --temp/--queue` runs (which execute in a copy of the repo) land in the same store.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcore.environment import git_commit
from gptcore.params import Params, repo_root


def tracking_uri(params: Params, root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def flatten(prefix: str, value) -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


class StageRun:
    """The MLflow run of one stage execution. Stages log through this object, not mlflow directly, so a
    machine without MLflow (the GPU box has none) can run them with GPTCORE_MLFLOW=off, which says so
    and keeps the records in a JSON file instead of dropping them."""

    def __init__(self, run=None, offline_path: Path | None = None):
        self._run = run
        self.offline_path = offline_path
        self.records: dict = {"params": {}, "metrics": [], "tags": {}, "artifacts": []}

    @property
    def run_id(self) -> str:
        return self._run.info.run_id if self._run else "offline"

    @property
    def tags(self) -> dict:
        """The tags set so far, the provenance ones (`git.commit`, `dvc.stage`) included."""
        return dict(self.records["tags"])

    def log_params(self, params: dict):
        if self._run:
            import mlflow

            mlflow.log_params(params)
        self.records["params"].update(params)

    def log_metrics(self, metrics: dict, step: int | None = None):
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if self._run:
            import mlflow

            mlflow.log_metrics(numeric, step=step)
        self.records["metrics"].append({"step": step, **numeric})

    def set_tags(self, tags: dict):
        if self._run:
            import mlflow

            mlflow.set_tags(tags)
        self.records["tags"].update(tags)

    def log_artifact(self, path: str | Path):
        if self._run:
            import mlflow

            mlflow.log_artifact(str(path))
        self.records["artifacts"].append(str(path))

    def log_text(self, text: str, name: str):
        if self._run:
            import mlflow

            mlflow.log_text(text, name)
        self.records["artifacts"].append(name)


def mlflow_enabled() -> bool:
    value = os.environ.get("GPTCORE_MLFLOW", "on").lower()
    if value not in ("on", "off"):
        raise ValueError(f"GPTCORE_MLFLOW must be 'on' or 'off', got {value!r}")
    return value == "on"


@contextmanager
def stage_run(stage: str, params: Params, sections: list[str], run_name: str | None = None) -> Iterator[StageRun]:
    """Start an MLflow run for `stage`, logging the params of `sections` and the provenance tags."""
    root = repo_root()
    tags = {"dvc.stage": stage, "git.commit": git_commit(root)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    logged = {}
    for section in sections:
        logged.update(flatten(section, getattr(params, section).model_dump()))
    name = run_name or (f"{stage}:{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else stage)

    if not mlflow_enabled():
        path = root / "mlflow-offline" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        print(f"MLflow logging is off (GPTCORE_MLFLOW=off): {stage} records go to {path}")
        run = StageRun(offline_path=path)
        run.set_tags(tags)
        run.log_params(logged)
        yield run
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_name": name, **run.records}, indent=1))
        return

    import mlflow  # imported here: it takes seconds, and only stages need it

    mlflow.set_tracking_uri(tracking_uri(params, root))
    mlflow.set_experiment(params.mlflow.experiment)
    with mlflow.start_run(run_name=name, tags=tags) as active:
        run = StageRun(active)
        run.records["tags"].update(tags)  # already on the run (start_run): kept for StageRun.tags
        run.log_params(logged)
        yield run


# --------------------------------------------------------------------------------------------------
# Offline records into MLflow: stages run with GPTCORE_MLFLOW=off (the GPU machine has no MLflow) leave
# JSON files under mlflow-offline/; this puts each into the store as the run it would have been.
# --------------------------------------------------------------------------------------------------
def import_offline(path: Path, params: Params, experiment: str | None = None) -> str:
    """Create one MLflow run from an offline record (params, tags, every metric at its step). Returns the
    new run id. The record's artifacts are files of the machine that wrote it: they are listed in the
    `offline.artifacts` tag, not uploaded."""
    import mlflow
    from mlflow.entities import Metric, Param

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable offline MLflow record ({e})") from e
    missing = [k for k in ("run_name", "params", "metrics", "tags") if k not in record]
    if missing:
        raise ValueError(f"{path}: offline record lacks {missing} (expected the JSON that GPTCORE_MLFLOW=off writes)")
    mlflow.set_tracking_uri(tracking_uri(params))
    client = mlflow.MlflowClient()
    name = experiment or params.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    tags = {
        **{k: str(v) for k, v in record["tags"].items()},
        "offline.source": str(path),
        "offline.imported": "true",
        "offline.artifacts": ", ".join(record.get("artifacts", []))[:5000],
    }
    run = client.create_run(exp_id, run_name=record["run_name"], tags=tags)
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row["step"] or 0))
        for row in record["metrics"]
        for key, value in row.items()
        if key != "step"
    ]
    params_ = [Param(k, str(v)[:6000]) for k, v in record["params"].items()]
    # MLflow caps one batch at 100 params and 1000 metrics.
    for i in range(0, len(params_), 100):
        client.log_batch(run.info.run_id, params=params_[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv=None) -> int:
    import argparse

    from gptcore.params import load_params

    ap = argparse.ArgumentParser(description="Import offline stage records (GPTCORE_MLFLOW=off JSON) into MLflow")
    ap.add_argument("command", choices=["import"])
    ap.add_argument("paths", nargs="+", type=Path, help="JSON files written under mlflow-offline/")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: params mlflow.experiment)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    for path in args.paths:
        run_id = import_offline(path, params, args.experiment)
        print(f"{path}: imported as run {run_id} ({tracking_uri(params)})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
