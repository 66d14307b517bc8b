"""What every stage script shares: the command line (`--params`, `--set`), params loading, the working
directory its files live in, metrics and plot files, the MLflow run, and the one error policy.

A stage reads params.yaml and writes its outputs relative to its working directory: under `dvc exp run
--temp/--queue` that is the experiment's own copy of the repository, so concurrent experiments never
share a file. Only the MLflow store is shared (gptcore.tracking). Within one working directory a stage runs
once at a time (`workspace_lock`), as DVC runs one `dvc repro`.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from gptcore.errors import StageError, StageKilled, UserError
from gptcore.files import atomic_write_text, output_error
from gptcore.neighbours import registered
from gptcore.params import Params, example_assignment, load_params, parse_assignments, with_overrides, with_preset
from gptcore.tracking import stage_run

__all__ = [
    "StageError",
    "load",
    "main",
    "parser",
    "tracked",
    "workspace",
    "workspace_lock",
    "write_json",
    "write_metrics",
    "write_plot",
]


PARAMS_FILE = "params.yaml"  # in the working directory, as dvc.yaml's stages read it
LOCK_FILE = ".gptcore-{stage}.lock"  # in the working directory while the stage runs there


def workspace() -> Path:
    """Where a stage reads its inputs and writes its outputs: the working directory."""
    return Path.cwd().resolve()


def parser(description: str | None, section: str, command: str) -> argparse.ArgumentParser:
    """A stage's command line with the options every stage has; the stage adds its own. `command` is how a
    person runs it (`python -m gptcore train`), for the usage line, however it was started (DVC runs
    `python -m stages.train`, whose usage line would otherwise say `train.py`)."""
    example = example_assignment(section)
    ap = argparse.ArgumentParser(
        prog=command, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--params",
        help=f"the params file (default: {PARAMS_FILE}; where there is none, gptcore/params.py's defaults)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="assignments",
        help=f"override a parameter, value in YAML (repeatable): section.key=value (--set {example}), or a key "
        f"of {section} alone (--set {example.partition('.')[2]})",
    )
    ap.add_argument(
        "--preset",
        metavar="NAME",
        help="take this stage's sections of the preset NAME (gptcore/preset_files/NAME.yaml: GPU sizes) "
        "without editing params.yaml",
    )
    return ap


def load(
    args: argparse.Namespace, section: str, overrides: dict | None = None, sections: list[str] | None = None
) -> Params:
    """params.yaml (or --params), then the preset's `sections` (--preset), then the stage's own flags
    (`overrides`: {key of `section`: value}, None where not given), then every --set. Without --params and
    without a params.yaml here (a stage run in a folder of its own), the built-in defaults, said so."""
    if args.params is None and not Path(PARAMS_FILE).exists():
        print(f"note: no {PARAMS_FILE} here: the built-in defaults of gptcore/params.py")
        params = Params()
    else:
        params = load_params(args.params or PARAMS_FILE)
    if args.preset:
        params = with_preset(params, args.preset, sections or [section])
    updates = {f"{section}.{k}": v for k, v in (overrides or {}).items() if v is not None}
    updates.update(parse_assignments(args.assignments, section))
    return with_overrides(params, updates) if updates else params


def _open_lock(path: Path):
    """(the lock file at `path`, locked by this process, None), or (None, what the file says of the
    process that holds it)."""
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            return None, holder
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle, None
        handle.close()  # its holder removed the file as it ended: lock the one at the path now


@contextmanager
def workspace_lock(stage: str, root: Path | None = None) -> Iterator[None]:
    """One run of `stage` at a time in a working directory: a second is refused, naming the first. The lock
    is the OS's (flock), so it ends with its process: a killed run never blocks the next one. Experiments
    (`dvc exp run --temp/--queue`) each run in a directory of their own, so they never meet; torchrun's
    other ranks write no outputs and take no lock (the train stage calls `tracked` on rank 0 only)."""
    root = root or workspace()
    path = root / LOCK_FILE.format(stage=stage)
    try:
        handle, holder = _open_lock(path)
    except OSError as e:
        raise output_error(path, e) from e
    if handle is None:
        raise StageError(
            f"{root}: {stage} is already running in this folder ({holder or 'a process that is starting'}): "
            "one run at a time writes its outputs; wait for it to end or stop it first"
        )
    with handle:
        handle.truncate(0)
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            with suppress(OSError):  # while still locked: one that opened it meanwhile finds it gone, retries
                path.unlink(missing_ok=True)


@contextmanager
def tracked(stage: str, params: Params, sections: list[str], log: bool = True) -> Iterator:
    """The stage's run: the workspace lock, registered as running on this machine (for a bench run to see),
    then its MLflow run (a refused run logs nothing)."""
    with (
        workspace_lock(stage),
        registered(stage, workspace()),
        stage_run(stage, params, sections + ["mlflow"], log=log) as run,
    ):
        yield run


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "no figure"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_numeric(value, key: str = "") -> None:
    """DVC's metric tools tabulate numbers: a string in a metrics file is a column of noise."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numeric(v, f"{key}.{k}" if key else k)
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"metrics file value {key} = {value!r} is not a number: log it as an MLflow tag instead")


def write_metrics(stage: str, metrics: dict, root: Path | None = None, path: Path | None = None) -> Path:
    """metrics/<stage>.json (or `path`, a run by hand's): a few headline numbers (nested dicts allowed), nothing
    else."""
    _check_numeric(metrics)
    path = path or (root or workspace()) / "metrics" / f"{stage}.json"
    return atomic_write_text(path, json.dumps(_jsonable(metrics), indent=2) + "\n")


def write_json(path: Path, content) -> Path:
    """A plain output (a record, a report's data): any JSON, written atomically."""
    return atomic_write_text(path, json.dumps(_jsonable(content), indent=1) + "\n")


def write_plot(path: Path, rows: list[dict]) -> Path:
    """A CSV that `dvc plots show` renders (one row per step)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _stop(signum, frame):
    raise StageKilled(f"stopped by signal {signum}")


def main(fn: Callable[[], int]) -> int:
    """Run a stage's main: a UserError prints one line naming the problem and exits 2; SIGTERM unwinds
    like Ctrl-C (files already written stay whole, the MLflow run ends KILLED)."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        return fn()
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StageKilled) as e:
        print(f"stopped: {type(e).__name__} {e}".rstrip(), file=sys.stderr)
        return 130
