"""What every stage script shares: params loading, metrics and plot files, the MLflow run, and turning
a user error into one clear message and a non-zero exit instead of a traceback."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from gptcore.errors import UserError
from gptcore.files import atomic_write_text
from gptcore.params import Params, load_params, repo_root
from gptcore.tracking import stage_run


class StageError(UserError, RuntimeError):
    """A failure the user can act on; its message is the whole report."""


def parser(description: str | None) -> argparse.ArgumentParser:
    """A stage's command line with the option every stage has, `--params`; the stage adds its own."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    return ap


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return load_params(path if path.is_absolute() else repo_root() / path)


def tracked(stage: str, params: Params, sections: list[str]):
    return stage_run(stage, params, sections + ["mlflow"])


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "no figure"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_metrics(stage: str, metrics: dict, root: Path | None = None) -> Path:
    path = (root or repo_root()) / "metrics" / f"{stage}.json"
    return atomic_write_text(path, json.dumps(_jsonable(metrics), indent=2, sort_keys=False) + "\n")


def write_plot(path: Path, rows: list[dict]) -> Path:
    """A CSV that `dvc plots show` renders (one row per step)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def main(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (UserError, FileNotFoundError) as e:  # the message says what is wrong and where: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
