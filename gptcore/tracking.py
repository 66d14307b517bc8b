"""MLflow logging shared by every stage: one run per stage execution, tagged so it can be traced back.

The store defaults to `sqlite:///<project>/mlflow.db`. The project is DVC_ROOT when DVC runs the stage:
`dvc exp run --temp/--queue` runs execute in a temporary copy of the repository, and all of them log to
the one store of the project they came from. That is the only use of DVC_ROOT: a stage reads its params
and writes its outputs in its working directory (the experiment's copy).

Concurrent runs (`dvc queue start -j 2`) share that SQLite store: its creation and each experiment's are
serialised by a file lock beside it, and a write that meets a locked database is retried with backoff.
A run ended by Ctrl-C or SIGTERM is marked KILLED; one whose process died without a word (kill -9) is
marked KILLED by the next stage run on the same machine.

Tracking never ends a stage: a store that cannot be used (a server that does not answer, a damaged
mlflow.db) is named in one warning line and the stage's records go to mlflow-offline/, as with
GPTCORE_MLFLOW=off, for `python -m gptcore.tracking import` later. A project copied or moved elsewhere
logs its artifacts beside its own store: the experiment is re-pointed there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptcore.environment import git_commit
from gptcore.errors import StageKilled, UserError
from gptcore.files import atomic_write_text, not_utf8
from gptcore.params import Params

RETRIES = 6  # a locked SQLite write is retried this many times, waiting 0.1 s, 0.2 s, ... in between
# MLflow's own HTTP defaults (7 retries, backoff factor 2, a 120 s timeout) wait on a server that does not
# answer far longer than a stage should; these apply unless the environment sets them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
STATUSES = ("FINISHED", "FAILED", "KILLED")


class RecordError(UserError, ValueError):
    """An offline record that cannot be imported, or a store it cannot be imported into."""


def store_dir() -> Path:
    """The folder of the default MLflow store: the project (DVC_ROOT) or, run by hand, the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store (`sqlite:///path`), or None for any other store."""
    return Path(uri.removeprefix("sqlite:///")).absolute() if uri.startswith("sqlite:///") else None


def store_name(uri: str) -> str:
    """A store as its user knows it: a SQLite store's file, any other store's URI."""
    return uri.removeprefix("sqlite:///")


def failure_reason(error: BaseException) -> str:
    """What went wrong, in a few words: the first line of the error it all started from."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[Errno -?\d+\] ", "", lines[0])[:200] if lines else type(error).__name__


def offline_record_path(stage: str) -> Path:
    """Where a stage's records go without a store: mlflow-offline/ beside the store, so a temporary
    experiment's records outlive its workspace; the PID keeps concurrent runs' files apart."""
    return store_dir() / "mlflow-offline" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"


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
    db_file = sqlite_file(uri)
    if db_file is None:
        yield
        return
    import fcntl

    lock_path = db_file.parent / ".mlflow.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_sqlite_store(uri: str) -> None:
    """Read a SQLite store's file before MLflow opens it: MLflow retries a file it cannot open ten times
    with a growing backoff, and names a damaged one only in a traceback."""
    path = sqlite_file(uri)
    if path is None or not path.exists():
        return  # another kind of store, or a new one MLflow creates
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()


def open_client(uri: str):
    """An MlflowClient on the store at `uri`, checked first; raises whatever makes the store unusable."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_sqlite_store(uri)
    import mlflow  # imported here: it takes seconds, and only stages need it

    with store_lock(uri):  # the client creates a new store's tables
        return mlflow.MlflowClient(tracking_uri=uri)


def _folder_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)


def artifact_root(uri: str, name: str) -> str | None:
    """Where an experiment of a SQLite store keeps its artifacts: mlruns/<name> beside the store."""
    db_file = sqlite_file(uri)
    return None if db_file is None else (db_file.parent / "mlruns" / _folder_name(name)).as_uri()


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created if needed with its artifacts beside the store (not in the working
    directory, which for a temporary experiment is deleted after the run). An experiment whose artifacts
    are beside the store's former place (the project was copied or moved) is re-pointed to its folder."""
    location = artifact_root(uri, name)
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client.create_experiment(name, artifact_location=location)
        old = exp.artifact_location
        ours = old.startswith("file:") and old.endswith(f"/mlruns/{_folder_name(name)}")  # not one set by hand
        if location and old != location and ours:
            repoint(uri, name, exp.experiment_id, old, location)
        return exp.experiment_id


def repoint(uri: str, name: str, exp_id: str, old: str, new: str) -> None:
    """Move the artifact root of a SQLite store's experiment, and of its runs, from `old` to `new` (MLflow's
    API cannot change an experiment's artifact location), and of its logged models."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(sqlite_file(uri), timeout=30)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, int(exp_id)))
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            db.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?)"
                f" WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                (new, len(old) + 1, int(exp_id), len(old) + 1, old + "/"),
            )
    print(f"note: MLflow experiment {name!r} now keeps its artifacts in {new} (copied or moved from {old})")


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


def log_external_model(client, exp_id: str, run_id: str, model: dict) -> str:
    """A LoggedModel of run `run_id` whose weights stay outside MLflow (a DVC-tracked file its tags name), as
    MLflow 3's `mlflow.create_external_model` makes one, but on this client's store (the fluent API logs to
    the process's global one): created, given the MLmodel file that lets the registry take it, READY, its
    metrics logged to the run at `step` and linked to it, and the run's output. Returns the model's id.
    `model` is a record of `StageRun.log_model`."""
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    logged = client.create_logged_model(
        exp_id,
        name=model["name"],
        source_run_id=run_id,
        tags={**model["tags"], MLFLOW_MODEL_IS_EXTERNAL: "true"},
        params=model["params"],
        model_type=model.get("model_type"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        get_external_mlflow_model_spec(logged).save(os.path.join(tmp, MLMODEL_FILE_NAME))
        client.log_model_artifacts(logged.model_id, tmp)
    client.finalize_logged_model(logged.model_id, "READY")
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, model["step"], model_id=logged.model_id) for k, v in model["metrics"].items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, model["step"])])
    return logged.model_id


def finite_numbers(metrics: dict) -> dict[str, float]:
    """The metrics MLflow can take: finite ints and floats (not bools), as floats; the others are dropped."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class StageRun:
    """The MLflow run of one stage execution. Stages log through this object, not mlflow directly: it keeps
    every record too, so that without a store (GPTCORE_MLFLOW=off: the GPU box has no MLflow) or when the
    store fails, the records go to a JSON file (`offline_path`) instead of being lost."""

    def __init__(
        self,
        stage: str,
        name: str,
        client=None,
        run_id: str | None = None,
        offline_path: Path | None = None,
        uri="",
        experiment_id: str | None = None,
    ):
        self.stage = stage
        self.name = name
        self._client = client
        self._run_id = run_id
        self._uri = uri
        self._experiment_id = experiment_id
        self.offline_path = offline_path
        self.records: dict = {"params": {}, "metrics": [], "tags": {}, "artifacts": [], "models": []}

    @property
    def run_id(self) -> str:
        return self._run_id or "offline"

    @property
    def tags(self) -> dict:
        """The tags set so far, the provenance ones (`git.commit`, `dvc.stage`) included."""
        return dict(self.records["tags"])

    def _call(self, call: Callable[[], object]) -> None:
        """One call to the store; the first that fails sends the run's records offline."""
        if self._client is None:
            return
        try:
            with_retries(call)
        except Exception as e:  # noqa: BLE001 - a tracking failure never ends the stage
            self.go_offline(e, "failed during the run")

    def go_offline(self, error: BaseException, what: str) -> None:
        """From now on keep the records for an offline file, and say so in one line."""
        self._client = None
        self.offline_path = offline_record_path(self.stage)
        partial = f" (run {self._run_id} holds part of them)" if self._run_id else ""
        print(
            f"warning: MLflow store {store_name(self._uri)} {what} ({failure_reason(error)}): {self.stage}'s "
            f"records{partial} go offline to {self.offline_path}; import them later with "
            f"python -m gptcore.tracking import {self.offline_path}",
            file=sys.stderr,
        )

    def _batch(self, **kw) -> None:
        self._call(lambda: self._client.log_batch(self._run_id, **kw))

    def log_params(self, params: dict):
        if self._client is not None:
            from mlflow.entities import Param

            entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
                self._batch(params=entries[i : i + 100])
        self.records["params"].update(params)

    def log_metrics(self, metrics: dict, step: int | None = None):
        numeric = finite_numbers(metrics)
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
        self._call(lambda: self._client.log_artifact(self._run_id, str(path)))
        self.records["artifacts"].append(str(path))

    def log_model(
        self, name: str, step: int, params: dict, tags: dict, metrics: dict, model_type: str | None = None
    ) -> None:
        """A logged model of this run (MLflow 3) whose weights are a file outside MLflow that `tags` name (its
        path and sha256): no copy of them goes into the store. `metrics` are logged at `step`, linked to the
        model as well as the run. Offline, the record keeps it and `import` creates it."""
        numeric = finite_numbers(metrics)
        model = {
            "name": name,
            "model_type": model_type,
            "step": step,
            "params": {k: str(v) for k, v in params.items()},
            "tags": {k: str(v) for k, v in tags.items()},
            "metrics": numeric,
        }
        self._call(lambda: log_external_model(self._client, self._experiment_id, self._run_id, model))
        self.records["models"].append(model)

    def log_text(self, text: str, name: str):
        self._call(lambda: self._client.log_text(self._run_id, text, name))
        self.records["artifacts"].append(name)

    def end(self, status: str) -> None:
        """The run's status into the store or, offline, every record into the offline file."""
        self._call(lambda: self._client.set_terminated(self._run_id, status=status))
        if self._client is None and self.offline_path is not None:
            record = {"run_name": self.name, "status": status, **self.records}
            atomic_write_text(self.offline_path, json.dumps(record, indent=1))


def mlflow_enabled() -> bool:
    value = os.environ.get("GPTCORE_MLFLOW", "on").lower()
    if value not in ("on", "off"):
        raise ValueError(f"GPTCORE_MLFLOW must be 'on' or 'off', got {value!r}")
    return value == "on"


def open_run(stage: str, name: str, uri: str, experiment: str, tags: dict) -> StageRun:
    """A new run in the store at `uri` or, where that store cannot be used, an offline one that says so."""
    try:
        client = open_client(uri)
        exp_id = with_retries(lambda: experiment_id(client, experiment, uri))
        with contextlib.suppress(Exception):  # housekeeping: never the reason a stage fails
            mark_dead_runs_killed(client, exp_id)
        active = with_retries(lambda: client.create_run(exp_id, run_name=name, tags=tags))
    except Exception as e:  # noqa: BLE001 - a tracking failure never ends the stage
        run = StageRun(stage, name, uri=uri)
        run.go_offline(e, "cannot be used")
        return run
    return StageRun(stage, name, client, active.info.run_id, uri=uri, experiment_id=exp_id)


@contextmanager
def stage_run(
    stage: str, params: Params, sections: list[str], run_name: str | None = None, log: bool = True
) -> Iterator[StageRun]:
    """An MLflow run for `stage`, logging the params of `sections` and the provenance tags. It ends
    FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM), in the store or in its offline record.
    `log=False`: no store at all (a stage run outside any project), said so."""
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

    if not log:
        print(f"MLflow: {stage} is not logged (no project here; set MLFLOW_TRACKING_URI to log it)")
        run = StageRun(stage, name)
    elif not mlflow_enabled():
        run = StageRun(stage, name, offline_path=offline_record_path(stage))
        print(f"MLflow logging is off (GPTCORE_MLFLOW=off): {stage} records go to {run.offline_path}")
    else:
        run = open_run(stage, name, tracking_uri(params), params.mlflow.experiment, tags)
    run.records["tags"].update(tags)  # an online run has them already (create_run)
    status = "FAILED"
    try:
        run.log_params(logged)
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, StageKilled):
        status = "KILLED"
        raise
    finally:
        run.end(status)


# --------------------------------------------------------------------------------------------------
# Offline records into MLflow: stages run with GPTCORE_MLFLOW=off (the GPU machine has no MLflow) or with
# a store they could not use leave JSON files under mlflow-offline/; this puts each into the store as the
# run it would have been.
# --------------------------------------------------------------------------------------------------
def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def record_problem(record) -> str | None:
    """What keeps `record` from being the JSON a StageRun writes offline, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in ("run_name", "params", "metrics", "tags") if k not in record]
    if missing:
        return f"lacks {missing}"
    if not isinstance(record["run_name"], str):
        return f"run_name is {_shown(record['run_name'])}, not a string"
    for key in ("params", "tags"):
        if not isinstance(record[key], dict):
            return f"{key} is {_shown(record[key])}, not an object"
    if not isinstance(record["metrics"], list):
        return f"metrics is {_shown(record['metrics'])}, not a list"
    for i, row in enumerate(record["metrics"]):
        if not isinstance(row, dict):
            return f"metrics[{i}] is {_shown(row)}, not an object"
        for key, value in row.items():
            if key == "step":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    return f"metrics[{i}].step is {_shown(value)}, not an integer"
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"metrics[{i}].{key} is {_shown(value)}, not a number"
    artifacts = record.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(a, str) for a in artifacts):
        return f"artifacts is {_shown(artifacts)}, not a list of names"
    models = record.get("models", [])
    if not isinstance(models, list):
        return f"models is {_shown(models)}, not a list"
    for i, model in enumerate(models):
        problem = model_problem(model)
        if problem:
            return f"models[{i}]{problem}"
    if record.get("status", "FINISHED") not in STATUSES:
        return f"status is {_shown(record['status'])}, not one of {', '.join(STATUSES)}"
    return None


def model_problem(model) -> str | None:
    """What keeps `model` from being a logged model's record (`StageRun.log_model`), or None; the message
    follows the model's place in the record."""
    if not isinstance(model, dict):
        return f" is {_shown(model)}, not an object"
    missing = [k for k in ("name", "step", "params", "tags", "metrics") if k not in model]
    if missing:
        return f" lacks {missing}"
    if not isinstance(model["name"], str):
        return f".name is {_shown(model['name'])}, not a string"
    if isinstance(model["step"], bool) or not isinstance(model["step"], int):
        return f".step is {_shown(model['step'])}, not an integer"
    for key in ("params", "tags"):
        if not isinstance(model[key], dict) or not all(isinstance(v, str) for v in model[key].values()):
            return f".{key} is {_shown(model[key])}, not an object of strings"
    if not isinstance(model["metrics"], dict):
        return f".metrics is {_shown(model['metrics'])}, not an object"
    for key, value in model["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f".metrics.{key} is {_shown(value)}, not a number"
    if not isinstance(model.get("model_type"), (str, type(None))):
        return f".model_type is {_shown(model['model_type'])}, not a string"
    return None


def read_record(path: Path) -> dict:
    """An offline record, read and checked whole before anything of it goes into a store."""

    def refuse(why: str) -> RecordError:
        return RecordError(
            f"{path}: not an offline MLflow record: {why} (expected the JSON a stage writes under "
            "mlflow-offline/); nothing imported"
        )

    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise refuse(f"cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise refuse(f"not UTF-8 text ({not_utf8(e)})") from None
    except json.JSONDecodeError as e:
        raise refuse(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise refuse("JSON nested too deep") from None
    problem = record_problem(record)
    if problem:
        raise refuse(problem)
    return record


def import_offline(path: Path, params: Params, experiment: str | None = None) -> str:
    """Create one MLflow run from an offline record (params, tags, every metric at its step, its logged
    models, its status). Returns the new run id. The record's artifacts are files of the machine that wrote
    it: they are listed in the `offline.artifacts` tag, not uploaded."""
    record = read_record(path)
    uri = tracking_uri(params)
    try:
        return _import(record, path, uri, experiment or params.mlflow.experiment)
    except Exception as e:  # noqa: BLE001 - whatever the store raised, said in one line
        raise RecordError(f"{path}: not imported: MLflow store {store_name(uri)} failed ({failure_reason(e)})") from e


def _import(record: dict, path: Path, uri: str, experiment: str) -> str:
    from mlflow.entities import Metric, Param

    client = open_client(uri)
    exp_id = experiment_id(client, experiment, uri)
    tags = {
        **{k: str(v) for k, v in record["tags"].items()},
        "offline.source": str(path),
        "offline.imported": "true",
        "offline.artifacts": ", ".join(record.get("artifacts", []))[:5000],
    }
    run = client.create_run(exp_id, run_name=record["run_name"], tags=tags)
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row.get("step") or 0))
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
    for model in record.get("models", []):
        log_external_model(client, exp_id, run.info.run_id, model)
    client.set_terminated(run.info.run_id, status=record.get("status", "FINISHED"))
    return run.info.run_id


def main(argv=None) -> int:
    import argparse

    from gptcore import stage
    from gptcore.params import load_params

    ap = argparse.ArgumentParser(description="Import offline stage records (mlflow-offline/*.json) into MLflow")
    ap.add_argument("command", choices=["import"])
    ap.add_argument("paths", nargs="+", type=Path, help="JSON files written under mlflow-offline/")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: params mlflow.experiment)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    def run() -> int:
        for path in args.paths:  # every file checked before any is imported
            read_record(path)
        params = load_params(args.params)
        for path in args.paths:
            run_id = import_offline(path, params, args.experiment)
            print(f"{path}: imported as run {run_id} ({tracking_uri(params)})")
        return 0

    return stage.main(run)


if __name__ == "__main__":
    sys.exit(main())
