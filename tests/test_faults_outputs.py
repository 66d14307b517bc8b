"""Faults on the train stage's outputs, run as a user runs them on a prepared project: a read-only or full
out/ folder is named in one line (exit 2), a killed run's leftovers are removed at the next start (said
so), and a second train in the same folder is refused naming the first; no good file ever changes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import ROOT, digests, tiny_params, tiny_params_dict, write_corpus

from gptcore.checkpoint import load_checkpoint
from gptcore.errors import StageError
from gptcore.stage import LOCK_FILE, workspace_lock
from gptcore.train import LAST_CHECKPOINT, STAGED_CHECKPOINT, Trainer

# What a good run left, which no failing or refused run may change.
GOOD = [
    "out/ckpt.pt",
    "out/ckpt.json",
    "out/last.pt",
    "metrics/train.json",
    "plots/train_loss.csv",
    "plots/loss.png",
    "data/train.bin",
]
GOOD_OUT = ["ckpt.json", "ckpt.pt", "last.pt"]
LONG = ["--set", "train.max_iters=100000", "--set", "train.lr_decay_iters=100000", "--set", "train.eval_interval=5"]


def env(**extra) -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "GPTCORE_MLFLOW": "off", "DVC_NO_ANALYTICS": "1", **extra}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        e.pop(name, None)
    return e


GPTCORE_TRAIN = [sys.executable, "-m", "gptcore", "train"]


def train(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GPTCORE_TRAIN, *args], cwd=cwd, env=kw.pop("env", env()), capture_output=True, text=True, timeout=300, **kw
    )


def start_train(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [*GPTCORE_TRAIN, *args], cwd=cwd, env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The stage's one-line message: the only line that starts with `error: `, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def namespaces() -> bool:
    """Whether this user may mount in a namespace of its own (a tmpfs, a read-only bind mount)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def in_namespace(setup: str, then: str, cwd: Path) -> subprocess.CompletedProcess:
    """`setup` (mounts), then `then`, in a mount namespace: the mounts vanish with it."""
    script = f"set -e; {setup}; set +e; {then}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project after the quickstart: params, corpus, prepared data and a good trained checkpoint."""
    proj = tmp_path_factory.mktemp("faults") / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    write_corpus(proj / "corpus.txt")
    for stage in ("prepare", "train"):
        done = subprocess.run(
            [sys.executable, "-m", "gptcore", stage], cwd=proj, env=env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    return proj


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "proj", symlinks=True))


@pytest.mark.slow
def test_a_read_only_out_folder_is_named_in_one_line(project):
    before = digests(project, GOOD)
    out = project / "out"
    if os.geteuid() != 0:  # root writes through a folder's mode bits: it needs a read-only mount instead
        out.chmod(0o555)
        try:
            proc = train(project)
        finally:
            out.chmod(0o755)
        reason = "permission denied: the folder is not writable by this user"
    elif namespaces():
        proc = in_namespace(
            f"mount --bind {out} {out}; mount -o remount,bind,ro {out}", shlex.join(GPTCORE_TRAIN), project
        )
        reason = "the folder is on a read-only file system"
    else:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only for this process")
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == f"error: {out}: cannot write {STAGED_CHECKPOINT}: {reason}"
    assert digests(project, GOOD) == before
    assert sorted(os.listdir(out)) == GOOD_OUT


# A disk of GPTCORE_TEST_FULL_FREE bytes under GPTCORE_TEST_FULL_DIR, for a process it is loaded into (as
# sitecustomize): writes beyond it fail with ENOSPC and disk_usage reports what is left, as on a full disk.
# Each finished file's name and size are appended to GPTCORE_TEST_FULL_LOG.
FULL_DISK = """
import builtins, errno, io, os, shutil

_DIR = os.path.realpath(os.environ["GPTCORE_TEST_FULL_DIR"])
_FREE = int(os.environ["GPTCORE_TEST_FULL_FREE"])


def _used():
    return sum(entry.stat().st_size for entry in os.scandir(_DIR) if entry.is_file())


_START = _used()


def _free():
    return _FREE - (_used() - _START)


class _OnTheDisk(io.FileIO):
    def write(self, b):
        if len(b) > _free():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(b)

    def close(self):
        if not self.closed:
            with _open(os.environ["GPTCORE_TEST_FULL_LOG"], "a") as log:
                log.write(f"{os.path.basename(self.name)} {os.fstat(self.fileno()).st_size}\\n")
        super().close()


_open = builtins.open


def _fake_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
    if "w" in mode and isinstance(file, (str, os.PathLike)) and os.path.dirname(os.path.realpath(file)) == _DIR:
        f = io.BufferedWriter(_OnTheDisk(file, "w"))
        return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding, errors=errors, newline=newline)
    return _open(file, mode, buffering, encoding, errors, newline, closefd, opener)


builtins.open = io.open = _fake_open
_disk_usage = shutil.disk_usage


def _fake_disk_usage(path):
    usage = _disk_usage(path)
    return usage._replace(free=_free()) if os.path.realpath(path) == _DIR else usage


shutil.disk_usage = _fake_disk_usage
"""


@pytest.mark.slow
def test_a_full_disk_is_named_with_the_bytes_needed_and_leaves_no_partial_file(project, tmp_path):
    before = digests(project, GOOD)
    out = project / "out"
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FULL_DISK)
    log = tmp_path / "written.txt"
    free = 120_000  # room for the first evaluation's staged best (80 kB), not for last.pt beside it
    faulty = env(
        PYTHONPATH=f"{fault}{os.pathsep}{ROOT}",
        GPTCORE_TEST_FULL_DIR=str(out),
        GPTCORE_TEST_FULL_FREE=str(free),
        GPTCORE_TEST_FULL_LOG=str(log),
    )
    proc = train(project, env=faulty)
    assert proc.returncode == 2, proc.stderr
    (written,) = [line.split() for line in log.read_text().splitlines() if line.startswith(f".{STAGED_CHECKPOINT}.")]
    needed = int(written[1])  # last.pt holds what the staged best does: the same state, the same bytes
    assert error_line(proc) == (
        f"error: {out}: no space left on the device: {LAST_CHECKPOINT} needs {needed:,} bytes, "
        f"{free - needed:,} are free; free some space"
    )
    assert f"note: removed {out / STAGED_CHECKPOINT}: {LAST_CHECKPOINT} was not written beside it" in proc.stdout
    assert digests(project, GOOD) == before
    assert sorted(os.listdir(out)) == GOOD_OUT  # no temp file, no orphaned staged best


@pytest.mark.slow
def test_a_full_tmpfs_out_folder(project):
    """The same on a real full disk: out/ on a tmpfs too small for the next checkpoints."""
    if not namespaces():
        pytest.skip("no mount namespaces for this user: the fake full disk above covers the case")
    before = digests(project, GOOD)
    out, good = project / "out", project / "good"
    shutil.copytree(out, good)
    size_kib = sum(p.stat().st_size for p in good.iterdir()) // 1024 + 96  # the good files and a little
    proc = in_namespace(
        f"mount -t tmpfs -o size={size_kib}k tmpfs {out}; cp -p {good}/* {out}/",
        f"{shlex.join(GPTCORE_TRAIN)}; echo rc=$?; ls -A {out}; sha256sum {out}/*",
        project,
    )
    lines = proc.stdout.splitlines()
    assert "rc=2" in lines, proc.stderr
    line = error_line(proc)
    found = re.fullmatch(
        rf"error: {re.escape(str(out))}: no space left on the device: (ckpt\.pt\.next|last\.pt) needs "
        r"([\d,]+) bytes, ([\d,]+) are free; free some space",
        line,
    )
    assert found, line
    assert int(found[2].replace(",", "")) > int(found[3].replace(",", ""))
    listed = lines[lines.index("rc=2") + 1 : lines.index("rc=2") + 1 + len(GOOD_OUT)]
    assert listed == GOOD_OUT
    sums = {Path(name).name: sha for sha, name in (row.split() for row in lines[-len(GOOD_OUT) :])}
    assert sums == {name: before[f"out/{name}"] for name in GOOD_OUT}
    assert digests(project, [n for n in GOOD if not n.startswith("out/")]) == {
        n: h for n, h in before.items() if not n.startswith("out/")
    }


@pytest.mark.slow
def test_a_killed_train_leaves_nothing_half_written_after_the_next_start(project):
    out = project / "out"
    before = digests(project, GOOD)
    killed = start_train(project, *LONG)
    wait_for(lambda: (out / STAGED_CHECKPOINT).is_file(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(60)
    assert digests(project, ["out/ckpt.pt", "out/ckpt.json"]) == {
        k: before[k] for k in ("out/ckpt.pt", "out/ckpt.json")
    }
    assert (project / LOCK_FILE.format(stage="train")).is_file()  # a stale lock: its process is gone
    # What a kill in the middle of writing last.pt leaves: its temp file, half written.
    partial = out / f".{LAST_CHECKPOINT}.k1ll3d_x.tmp"
    partial.write_bytes((out / LAST_CHECKPOINT).read_bytes()[:1000])

    proc = train(project)
    assert proc.returncode == 0, proc.stderr
    assert (
        f"note: removed {out / STAGED_CHECKPOINT}: the best checkpoint of an earlier run that did not finish, "
        "never promoted (this run starts afresh)" in proc.stdout
    )
    assert (
        f"note: removed {partial}: a write of {LAST_CHECKPOINT} that never finished (its run was killed)" in proc.stdout
    )
    assert sorted(os.listdir(out)) == GOOD_OUT
    assert not (project / LOCK_FILE.format(stage="train")).exists()


@pytest.mark.slow
def test_a_second_train_in_the_same_folder_is_refused_naming_the_first(project):
    from mlflow import MlflowClient

    before = digests(project, [n for n in GOOD if n != "out/last.pt"])
    tracked = env(GPTCORE_MLFLOW="on")
    first = start_train(project, *LONG, env=tracked)
    try:
        wait_for(lambda: (project / "mlflow.db").is_file() and (project / "out" / STAGED_CHECKPOINT).is_file(), first)
        second = train(project, env=tracked)
        assert second.returncode == 2, second.stderr
        line = error_line(second)
        pattern = (
            rf"error: {re.escape(str(project))}: train is already running in this folder \(PID {first.pid} on "
            rf"{re.escape(socket.gethostname())}, since [\d-]+ [\d:]+\): one run at a time writes its outputs; "
            r"wait for it to end or stop it first"
        )
        assert re.fullmatch(pattern, line), line
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert digests(project, before) == before
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptcore").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]  # the first, stopped; the refused one logged nothing


def test_the_lock_names_its_holder_and_ends_with_it(tmp_path):
    with workspace_lock("train", tmp_path):
        lock = tmp_path / LOCK_FILE.format(stage="train")
        assert lock.read_text().startswith(f"PID {os.getpid()} on ")
        with pytest.raises(StageError, match=rf"train is already running in this folder \(PID {os.getpid()} on "):
            with workspace_lock("train", tmp_path):
                pass
        with workspace_lock("sample", tmp_path):  # another stage's outputs: its own lock
            pass
    assert not lock.exists()
    with workspace_lock("train", tmp_path):  # free again
        pass


def test_a_resumed_run_keeps_its_own_staged_best_and_removes_another(root, capsys):
    params = tiny_params()
    resumed = params.model_copy(update={"train": params.train.model_copy(update={"resume": True})})
    staged = root / "out" / STAGED_CHECKPOINT
    Trainer(params, root).run(stop_after=20)  # stopped after the evaluation at 20: its staged best stays
    own = staged.read_bytes()
    best_iter = load_checkpoint(root / "out" / LAST_CHECKPOINT)["best_iter"]
    Trainer(resumed, root).remove_leftovers()
    assert staged.read_bytes() == own and "note:" not in capsys.readouterr().out

    other = root / "other"
    other.mkdir()
    (other / "data").symlink_to(root / "data")
    Trainer(tiny_params(train={"seed": 2}), other).run(stop_after=10)
    shutil.copy(other / "out" / STAGED_CHECKPOINT, staged)  # another run's best beside this run's last.pt
    Trainer(resumed, root).remove_leftovers()
    assert not staged.exists()
    assert f"note: removed {staged}: not the best checkpoint (iteration {best_iter}) of the run last.pt continues" in (
        capsys.readouterr().out
    )
