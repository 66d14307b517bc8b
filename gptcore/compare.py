"""`python -m gptcore compare`: this project's experiments side by side, one row each after the baseline
(the commit they started from): the params that differ between them, the best and final validation loss,
ms per training iteration and verify's status.

    python -m gptcore compare        # in the project (or below it), after `dvc exp run`

It reads `dvc exp show --json` (the experiments of HEAD, as `dvc exp show` lists them), so it sees the queued,
running and failed experiments too; a value an experiment has not written yet is "-".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

from gptcore.errors import UserError

MISSING = "-"
UNFINISHED = ("queued", "running", "failed")  # executor states whose metrics are not the experiment's own


class CompareError(UserError):
    """Nothing to compare: not a DVC project, no experiments, or `dvc exp show` failed."""


def dvc_root(start: Path) -> Path:
    """The DVC project `start` is in: the nearest folder at or above it with a .dvc folder."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise CompareError(
        f"{start} is not in a DVC project (no .dvc folder here or above): run `python -m gptcore compare` in "
        'the project, after `dvc exp run` (README "Experiments")'
    )


def exp_show(root: Path) -> list[dict]:
    """`dvc exp show --json` of the project at `root`: its baselines, each with its experiments."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareError(f"`dvc exp show --json` in {root} failed ({proc.returncode}): {proc.stderr.strip()}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise CompareError(f"`dvc exp show --json` in {root} gave no JSON ({e}): {proc.stdout[:200]!r}") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 1}} -> {"train.seed": 1}: params as `dvc exp show` and `-S` name them."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def entry(name: str, rev: dict, baseline: bool, state: str | None = None) -> dict:
    """One row's data from a `dvc exp show --json` revision: its params (flat) and metrics files."""
    data = rev.get("data") or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()}
    if state in UNFINISHED:
        metrics = {}  # a queued experiment shows its baseline's files: not figures of its own
    return {"name": name, "baseline": baseline, "state": state, "params": params, "metrics": metrics}


def entries(shown: list[dict]) -> list[dict]:
    """The baseline (HEAD) and its experiments, in `dvc exp show`'s order; the workspace row is left out."""
    rows = []
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        label = baseline.get("name") or baseline["rev"][:7]
        rows.append(entry(f"{label} (baseline)", baseline, True))
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            state = (exp.get("executor") or {}).get("state")
            rows.append(entry(exp.get("name") or rev["rev"][:7], rev, False, state))
    return rows


def differing_params(rows: list[dict]) -> list[str]:
    """The params whose values are not the same in every row, in params.yaml's order."""
    names = list(dict.fromkeys(name for r in rows for name in r["params"]))
    return [n for n in names if len({json.dumps(r["params"].get(n)) for r in rows}) > 1]


def verify_status(verify: dict) -> str:
    """pass, FAIL or incomplete (something skipped, nothing failed), with the levels that passed."""
    if not verify:
        return MISSING
    passed, failed, skipped = (int(verify.get(k, 0)) for k in ("passed", "failed", "skipped"))
    status = "FAIL" if failed else "incomplete" if skipped else "pass"
    return f"{status} ({passed}/{passed + failed + skipped} passed)"


def number(value, digits: int) -> str:
    return MISSING if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    params = differing_params(rows)
    headers = ["experiment", *params, "best val loss", "final val loss", "ms/iter", "verify"]
    body = []
    for r in rows:
        train = r["metrics"].get("metrics/train.json", {})
        name = f"{r['name']} ({r['state']})" if r["state"] in UNFINISHED else r["name"]
        body.append(
            [
                name,
                *(MISSING if r["params"].get(p) is None else str(r["params"][p]) for p in params),
                number(train.get("best_val_loss"), 4),
                number(train.get("final_val_loss"), 4),
                number(train.get("ms_per_iter"), 2),
                verify_status(r["metrics"].get("metrics/verify.json", {})),
            ]
        )
    align = ["left"] * (1 + len(params)) + ["right"] * 3 + ["left"]
    return tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align)


def compare(start: Path) -> str:
    root = dvc_root(start.resolve())
    rows = entries(exp_show(root))
    if all(r["baseline"] for r in rows):
        raise CompareError(
            f"{root} has no experiments of HEAD to compare: run some first, e.g. `dvc exp run --temp -S "
            'train.seed=7` (README "Experiments")'
        )
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gptcore compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.parse_args(argv)
    try:
        print(compare(Path.cwd()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
