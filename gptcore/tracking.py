"""MLflow logging shared by every stage: one run per stage execution, tagged so it can be traced back.

The store defaults to `sqlite:///<project>/mlflow.db`. The project is DVC_ROOT when DVC runs the stage:
`dvc exp run --temp/--queue` runs execute in a temporary copy of the repository, and all of them log to
the one store of the project they came from. That is the only use of DVC_ROOT: a stage reads its params
and writes its outputs in its working directory (the experiment's copy).

Concurrent runs (`dvc queue start -j 2`) share that SQLite store: its creation and each experiment's are
serialised by a file lock beside it, and a write that meets a locked database is retried with backoff.
A run ended by Ctrl-C or SIGTERM is marked KILLED; one whose process died without a word (kill -9) is
marked KILLED by the next stage run on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcore.environment import git_commit
from gptcore.errors import StageKilled
from gptcore.params import Params

RETRIES = 6  # a locked SQLite write is retried this many times, waiting 0.1 s, 0.2 s, ... in between


def store_dir() -> Path:
    """The folder of the default MLflow store: the project (DVC_ROOT) or, run by hand, the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def _locked_database(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is SQLite's: a locked or busy database."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OperationalError, sqlite3.OperationalError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def with_retries(call: Callable[[], object]) -> object:
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - only SQLite's own locking errors are retried
            if attempt == RETRIES or not _locked_database(e):
                raise
            time.sleep(0.1 * 2**attempt)
    return None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on a SQLite store's folder while the store or an experiment is created: two
    processes creating the same tables at once fail ("table metrics already exists")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///")).parent / ".mlflow.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if needed with its artifacts beside the store (not in the working
    directory, which for a temporary experiment is deleted after the run)."""
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / safe).as_uri()
        return client.create_experiment(name, artifact_location=location)


def mark_dead_runs_killed(client, exp_id: str) -> None:
    """Runs of this machine still RUNNING although their process is gone (kill -9, a lost machine) are
    marked KILLED, so the store never shows a run as running forever."""
    host = socket.gethostname()
    runs = client.search_runs(
        [exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`gptcore.host` = '{host}'", max_results=200
    )
    for run in runs:
        pid = run.data.tags.get("gptcore.pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def __init__(self, client=None, run_id: str | None = None, offline_path: Path | None = None):
        self._client = client
        self._run_id = run_id
        self.offline_path = offline_path
        self.records: dict = {"params": {}, "metrics": [], "tags": {}, "artifacts": []}

    @property
    def run_id(self) -> str:
        return self._run_id or "offline"

    @property
    def tags(self) -> dict:
        """The tags set so far, the provenance ones (`git.commit`, `dvc.stage`) included."""
        return dict(self.records["tags"])

    def _batch(self, **kw) -> None:
        if self._client is not None:
            with_retries(lambda: self._client.log_batch(self._run_id, **kw))

    def log_params(self, params: dict):
        from_mlflow = []
        if self._client is not None:
            from mlflow.entities import Param

            from_mlflow = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(from_mlflow), 100):  # MLflow takes at most 100 params per batch
            self._batch(params=from_mlflow[i : i + 100])
        self.records["params"].update(params)

    def log_metrics(self, metrics: dict, step: int | None = None):
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            entries = [Metric(k, v, now, step or 0) for k, v in numeric.items()]
            for i in range(0, len(entries), 1000):  # and at most 1000 metrics
                self._batch(metrics=entries[i : i + 1000])
        self.records["metrics"].append({"step": step, **numeric})

    def set_tags(self, tags: dict):
        if self._client is not None:
            from mlflow.entities import RunTag

            self._batch(tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.records["tags"].update(tags)

    def log_artifact(self, path: str | Path):
        if self._client is not None:
            with_retries(lambda: self._client.log_artifact(self._run_id, str(path)))
        self.records["artifacts"].append(str(path))

    def log_text(self, text: str, name: str):
        if self._client is not None:
            with_retries(lambda: self._client.log_text(self._run_id, text, name))
        self.records["artifacts"].append(name)


def mlflow_enabled() -> bool:
    value = os.environ.get("GPTCORE_MLFLOW", "on").lower()
    if value not in ("on", "off"):
        raise ValueError(f"GPTCORE_MLFLOW must be 'on' or 'off', got {value!r}")
    return value == "on"


@contextmanager
def stage_run(
    stage: str, params: Params, sections: list[str], run_name: str | None = None, log: bool = True
) -> Iterator[StageRun]:
    """An MLflow run for `stage`, logging the params of `sections` and the provenance tags. It ends
    FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM). `log=False`: no store at all (a stage run
    outside any project), said so."""
    tags = {
        "dvc.stage": stage,
        "git.commit": git_commit(Path.cwd()),
        "gptcore.host": socket.gethostname(),
        "gptcore.pid": str(os.getpid()),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    logged = {}
    for section in sections:
        logged.update(flatten(section, getattr(params, section).model_dump()))
    name = run_name or (f"{stage}:{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else stage)

    if not log or not mlflow_enabled():
        path = Path.cwd() / "mlflow-offline" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.json" if log else None
        if path is None:
            print(f"MLflow: {stage} is not logged (no project here; set MLFLOW_TRACKING_URI to log it)")
        else:
            print(f"MLflow logging is off (GPTCORE_MLFLOW=off): {stage} records go to {path}")
        run = StageRun(offline_path=path)
        run.set_tags(tags)
        run.log_params(logged)
        yield run
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run_name": name, **run.records}, indent=1))
        return

    import mlflow  # imported here: it takes seconds, and only stages need it

    uri = tracking_uri(params)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = with_retries(lambda: experiment_id(client, params.mlflow.experiment, uri))
    with contextlib.suppress(Exception):  # housekeeping: never the reason a stage fails
        mark_dead_runs_killed(client, exp_id)
    active = with_retries(lambda: client.create_run(exp_id, run_name=name, tags=tags))
    run = StageRun(client, active.info.run_id)
    run.records["tags"].update(tags)  # already on the run (create_run): kept for StageRun.tags
    status = "FAILED"
    try:
        run.log_params(logged)
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, StageKilled):
        status = "KILLED"
        raise
    finally:
        with_retries(lambda: client.set_terminated(run.run_id, status=status))


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
    uri = tracking_uri(params)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment or params.mlflow.experiment, uri)
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
