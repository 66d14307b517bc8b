"""What else runs on this machine while a benchmark measures: the gptcore stages running now, and the CPU time
that other processes take.

Every stage registers itself while it runs (`registered`, from stage.tracked): a small JSON file named by its
PID in a per-user runtime folder, removed as it ends; one left by a killed stage is ignored (its process is
gone, or the PID now belongs to a process started later) and removed by the next reader. This sees what the
per-folder stage lock cannot: the experiments of `dvc queue start -j N` each run in a copy of the project of
their own. The bench stage checks both around every row it measures (`Watch`), so a row measured beside a
training run, or on a machine whose CPUs were busy with other work, says so in its record.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from gptcore.files import atomic_write_text

RUNTIME_DIR_ENV = "GPTCORE_RUNTIME_DIR"  # where the stages register (default: $XDG_RUNTIME_DIR/gptcore)
# Other processes busier than this share of all the CPUs during a row disturb it: on 2 CPUs, one busy thread
# of another program is 50%; background daemons stay at a few percent.
BUSY_SHARE = 0.25
# CPU times count in clock ticks (10 ms): a row shorter than this is judged over the last MIN_WINDOW_S seconds.
MIN_WINDOW_S = 1.0


def runtime_dir() -> Path:
    """The folder the running stages register in: this user's, shared by every project and experiment."""
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "gptcore"
    return Path(tempfile.gettempdir()) / f"gptcore-{os.getuid()}"


@dataclass(frozen=True)
class StageRun:
    """A stage running on this machine, as it registered itself."""

    pid: int
    stage: str
    folder: str
    started: float  # its process's start time (seconds since the epoch), telling it from a later one of its PID

    def __str__(self) -> str:
        return f"{self.stage} (pid {self.pid}) in {self.folder}"

    def alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1.0
        except psutil.Error:  # gone (or a zombie), or another user's process holds the PID now
            return False


@contextmanager
def registered(stage: str, folder: Path) -> Iterator[None]:
    """`stage`, running in `folder`, registered for as long as the block runs. A runtime folder that cannot be
    written is said on one line and the stage goes on: a benchmark run meanwhile will not know of it."""
    me = psutil.Process()
    path = runtime_dir() / f"{me.pid}.json"
    entry = {"pid": me.pid, "stage": stage, "folder": str(folder), "started": me.create_time()}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.parent.stat().st_uid != os.getuid():  # in a shared /tmp, another user's folder of that name
            raise PermissionError(f"{path.parent} belongs to another user")
        atomic_write_text(path, json.dumps(entry) + "\n")
    except OSError as e:
        print(f"warning: cannot register this {stage} run in {path.parent} ({e}): a bench run now will not know of it")
        yield
        return
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink(missing_ok=True)


def running_stages() -> list[StageRun]:
    """The gptcore stages running on this machine now, other than this process's own; the entries of stages
    that ended without removing theirs (killed) are removed."""
    found = []
    for path in sorted(runtime_dir().glob("*.json")):
        try:
            run = StageRun(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue  # removed meanwhile, or not one of ours
        if run.pid == os.getpid():
            continue
        if run.alive():
            found.append(run)
        else:
            with suppress(OSError):
                path.unlink(missing_ok=True)
    return found


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.monotonic()
    busy: float  # CPU seconds every CPU of the machine has been busy, all processes
    own: float  # CPU seconds of this process, its threads and its finished children


def cpu_sample() -> CpuSample:
    t = psutil.cpu_times()
    # guest time is counted in user time too (Linux); idle and waiting for I/O are not work
    busy = sum(t) - t.idle - sum(getattr(t, name, 0.0) for name in ("iowait", "guest", "guest_nice"))
    own = psutil.Process().cpu_times()
    return CpuSample(time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system)


def others_share(before: CpuSample, after: CpuSample, cpus: int) -> float:
    """The share of all `cpus` that processes other than this one kept busy between the two samples."""
    wall = after.at - before.at
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / (wall * cpus)


class Watch:
    """What ran beside each measured row: `start()` before the row, `stop()` after it gives the row's fields
    `neighbours` (the gptcore stages running at its start or end), `others_cpu` (the share of the CPUs other
    processes kept busy while it ran, over the last MIN_WINDOW_S seconds for a shorter row) and `disturbed`
    (what of these disturbed it, in words; None when nothing did)."""

    def __init__(self):
        self.cpus = psutil.cpu_count() or 1
        self.samples = [cpu_sample()]  # row starts, the oldest kept only while a window may need it
        self.stages: dict[int, StageRun] = {}

    def start(self) -> None:
        self.stages = {run.pid: run for run in running_stages()}
        self.samples.append(cpu_sample())

    def stop(self) -> dict:
        now = cpu_sample()
        stages = {**self.stages, **{run.pid: run for run in running_stages()}}
        older = [s for s in self.samples if now.at - s.at >= MIN_WINDOW_S]
        base = older[-1] if older else self.samples[0]  # the row's own start when it lasted the window
        self.samples = self.samples[self.samples.index(base) :]
        share = others_share(base, now, self.cpus)
        reasons = [str(run) for run in stages.values()]
        if share > BUSY_SHARE:
            reasons.append(f"other processes kept {share:.0%} of the {self.cpus} CPUs busy")
        return {"disturbed": "; ".join(reasons) or None, "neighbours": reasons[: len(stages)], "others_cpu": share}


def warnings(records: list[dict]) -> list[str]:
    """What disturbed the measured rows, a line for each stage that ran beside them and one for busy CPUs,
    with how many rows each touched."""
    measured = [r for r in records if "disturbed" in r]
    beside: dict[str, int] = {}
    for r in measured:
        for neighbour in r["neighbours"]:
            beside[neighbour] = beside.get(neighbour, 0) + 1
    causes = [(n, f"{neighbour} ran") for neighbour, n in beside.items()]
    busy = [r["others_cpu"] for r in measured if r["others_cpu"] > BUSY_SHARE]
    if busy:
        causes.append((len(busy), f"other processes kept up to {max(busy):.0%} of the CPUs busy"))
    return [
        f"warning: {n} of {len(measured)} rows measured while {cause}: their figures are not this machine's alone "
        "(re-measure when it is idle: dvc repro -f -s bench)"
        for n, cause in causes
    ]


def disturbed_rows(records: list[dict]) -> int:
    return sum(1 for r in records if r.get("disturbed"))
