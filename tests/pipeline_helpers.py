"""Small projects for tests: a tiny corpus, tiny params, and a copy of the repo to run DVC in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from gptcore.files import sha256_file
from gptcore.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
# Stage params that keep a pipeline run cheap where bench and sample only need to run.
FAST_STAGES = {
    "bench": {"cases": ["train"], "backends": ["torch"], "warmup": 1, "repeats": 1, "min_repeat_ms": 0.0},
    "sample": {"num_samples": 1, "max_new_tokens": 20},
}


def digests(root: Path, names=(".",)) -> dict[str, str]:
    """sha256 of each named file under `root` (a folder's name stands for every file below it; by default the
    whole tree), by path: what a test compares before and after to prove that nothing good changed."""
    out = {}
    for name in names:
        path = root / name
        if not path.exists():
            out[name] = None  # absent: a file that appears or vanishes changes the digests
            continue
        for p in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


# A few speeches in tiny-shakespeare's shape, repeated so there is something to learn.
SPEECHES = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

MENENIUS:
What work's, my countrymen, in hand? where go you
With bats and clubs? The matter? speak, I pray you.

"""

# Head dim 32: the smallest the cuTile attention kernel takes, so the tiny project also runs on a GPU.
TINY = {
    "model": {"n_layer": 1, "n_head": 1, "n_embd": 32, "block_size": 16, "dropout": 0.0, "bias": True},
    "train": {
        "batch_size": 8,
        "max_iters": 30,
        "warmup_iters": 5,
        "lr_decay_iters": 30,
        "eval_interval": 10,
        "eval_iters": 4,
        "log_interval": 5,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
    },
}


def write_corpus(path: Path, repeats: int = 40) -> Path:
    path.write_text(SPEECHES * repeats, encoding="utf-8")
    return path


def tiny_params_dict(**sections) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY}.items():
        raw[section].update(values)
    raw["data"]["corpus"] = "corpus.txt"
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_params(**sections) -> Params:
    return parse_params(tiny_params_dict(**sections))


def make_project(dest: Path, **sections) -> Path:
    """A git + DVC repo holding a copy of this project with tiny params and a tiny corpus."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("gptcore", "stages", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**sections), sort_keys=False))
    write_corpus(dest / "corpus.txt")
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    # the project's DVC config, its default remote included: ../gptcore-dvc-remote, a folder beside `dest`
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "tiny project"], dest)
    return dest


def env_for(project: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(project)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run cmd in cwd, its output captured. Into files, not pipes: `dvc queue start` leaves daemonized
    workers holding the command's stdout, and reading a pipe would wait for them to exit (a worker that
    hangs in its shutdown would hang the test), where a file is done when the command itself is."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=err, text=True, env=kw.pop("env", env_for(cwd)), **kw)
        out.seek(0)
        err.seek(0)
        proc.stdout, proc.stderr = out.read(), err.read()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
