"""A non-editable install is whole: `pip install .` into a fresh virtual environment, then the stages run from
an empty folder with nothing of the checkout on the path (the stage code and the presets ship in the package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from pipeline_helpers import ROOT

# Seconds, not minutes: a model of one narrow layer, two iterations, one evaluation batch.
TINY_TRAIN = [
    "train.max_iters=2",
    "train.warmup_iters=1",
    "train.lr_decay_iters=2",
    "train.batch_size=4",
    "train.eval_iters=1",
    "model.n_layer=1",
    "model.n_head=1",
    "model.n_embd=32",
    "model.block_size=16",
]


def site_packages_of_this_python() -> list[str]:
    """Where this interpreter finds torch and the other dependencies, for the new environment to reuse."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


def make_venv(folder: Path) -> Path:
    """A fresh virtual environment that sees this interpreter's dependencies through a .pth file: their
    paths come after its own site-packages, and the .pth files there (an editable gptcore's) are not run."""
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text("\n".join(site_packages_of_this_python()) + "\n")
    return python


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(GPTCORE_MLFLOW="off", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_wheel_install_runs_the_stages_in_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # the files a wheel is built from; the build writes here, not in the checkout
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "gptcore", source / "gptcore", ignore=shutil.ignore_patterns("__pycache__"))
    python = make_venv(tmp_path / "venv")
    installed = run([python, "-m", "pip", "install", "-q", "--no-deps", str(source)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    work = tmp_path / "work"
    work.mkdir()
    where = run([python, "-c", "import gptcore; print(gptcore.__file__)"], work)
    package = Path(where.stdout.strip())
    assert package.is_relative_to(tmp_path / "venv") and "site-packages" in package.parts, where

    helped = run([python, "-m", "gptcore", "train", "--help"], work)
    assert helped.returncode == 0 and "usage: python -m gptcore train" in helped.stdout, helped.stderr
    assert "--set KEY=VALUE" in helped.stdout and "--preset NAME" in helped.stdout

    prepared = run([python, "-m", "gptcore", "prepare"], work)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "note: no params.yaml here: the built-in defaults" in prepared.stdout
    assert {p.name for p in (work / "data").iterdir()} == {"train.bin", "val.bin", "meta.json", "tokenizer.json"}

    overrides = [arg for key in TINY_TRAIN for arg in ("--set", key)]
    trained = run([python, "-m", "gptcore", "train", "--preset", "tiny_cpu", *overrides], work)  # the shipped preset
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert {p.name for p in (work / "out").iterdir()} == {"ckpt.pt", "ckpt.json", "last.pt"}
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    assert metrics["iterations"] == 2 and metrics["n_params"] > 0
    assert (work / "plots" / "train_loss.csv").read_text().startswith("iter,")
