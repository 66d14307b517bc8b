"""The one timer and the one record schema of every benchmark: the bench stage, the kernel bench and the
tile sweeps (gptcore.bench.tune).

A figure is the median over `repeats` timed repeats after `warmup` untimed calls (compilation, autotuning
and the allocator settle there), with the spread (min, max) beside it. On a GPU a repeat is timed with
CUDA events on the stream; on a CPU with perf_counter. A call much shorter than `min_repeat_ms` is looped
inside a repeat, so the timer's own resolution does not dominate a 30 us kernel. With `row_seconds`, a row
stops early when its warm-up and repeats have taken that long (at least one of each): a slow row (an eager
decode of a whole block) costs seconds, not minutes, and the record says how many repeats it got. `Timer.graph` times
replays of the call captured as a CUDA graph: GPU time, without the host's launch cost.

A record is a dict: case, implementation, shape, dtype, status (`ok` | `skipped` | `failed`), the reason
when not ok, the timing, derived figures (TFLOP/s, GB/s, tokens/s), and where and with what it was
measured (gptcore.environment). A row that cannot run here is `skipped` with the reason: nothing silently
falls back to another implementation.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptcore.cuda_graphs import capture
from gptcore.environment import environment
from gptcore.neighbours import Watch

OK, SKIPPED, FAILED = "ok", "skipped", "failed"


class Skip(Exception):
    """A row that cannot run here; the message is the reason recorded."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_cuda_graphs(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip(f"CUDA graphs need a CUDA device; this run is on {device.type}")


@dataclass
class Timer:
    device: torch.device
    warmup: int = 2
    repeats: int = 5  # at most, with row_seconds
    min_repeat_ms: float = 10.0
    row_seconds: float | None = None  # a row's time budget: warm-up and repeats stop once it is spent

    def _once(self, fn: Callable[[], object], calls: int) -> float:
        """Milliseconds per call over `calls` back-to-back calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1000 / calls

    def __call__(self, fn: Callable[[], object]) -> dict:
        synchronize(self.device)
        t0 = time.perf_counter()

        def spent(fraction: float) -> bool:
            return self.row_seconds is not None and time.perf_counter() - t0 >= fraction * self.row_seconds

        for _ in range(self.warmup):
            estimate = self._once(fn, 1)
            if spent(0.5):  # at most half of the budget warms up
                break
        calls = max(1, math.ceil(self.min_repeat_ms / max(estimate, 1e-3)))
        times = []
        while len(times) < self.repeats and not (times and spent(1.0)):
            times.append(self._once(fn, calls))
        return {
            "ms": statistics.median(times),
            "ms_min": min(times),
            "ms_max": max(times),
            "repeats": len(times),
            "calls_per_repeat": calls,
        }

    def graph(self, fn: Callable[[], object]) -> dict:
        """The timing of `fn` replayed as a CUDA graph (GPU time only), captured after three eager calls on
        the capturing stream (every kernel launched, compiled and set up once before capture)."""
        require_cuda_graphs(self.device)
        return self(capture(fn, torch.cuda.Stream(self.device), warmup=3).replay)


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 200, warmup: int = 10) -> dict:
    """Host milliseconds per call of `fn` at sizes where the GPU's share is negligible: `calls` calls
    back to back, one synchronisation at the end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    ms = (time.perf_counter() - t0) * 1000 / calls
    return {"ms": ms, "ms_min": ms, "ms_max": ms, "repeats": 1, "calls_per_repeat": calls}


def append_csv(path: str | Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path` (its header first when the file is new): the rows a bench writes for
    results/. Keys outside `fields` are left out."""
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


class Recorder:
    """Runs measurements and keeps one record per row; a failure becomes a `failed` row, not a crash."""

    def __init__(
        self, device: torch.device, timer: Timer, log: Callable[[str], None] = print, watch: Watch | None = None
    ):
        self.device = device
        self.timer = timer
        self.watch = watch  # when given, each measured row records what ran beside it (`disturbed`, ...)
        self.env = environment(device)
        self.records: list[dict] = []
        self.log = log

    def add(
        self, case: str, implementation: str, shape: str, dtype: str, status: str, reason: str | None = None, **fields
    ) -> dict:
        rec = {
            "case": case,
            "implementation": implementation,
            "shape": shape,
            "dtype": dtype,
            "status": status,
            "reason": reason,
            **fields,
            **self.env,
        }
        self.records.append(rec)
        figure = f"{rec['ms']:10.4f} ms" if status == OK else f"{status}: {reason}"
        if rec.get("disturbed"):
            figure += "  ! disturbed"
        self.log(f"  {case:<20} {shape:<22} {dtype:<9} {implementation:<28} {figure}")
        return rec

    def measure(
        self,
        case: str,
        implementation: str,
        shape: str,
        dtype: str,
        setup: Callable[[], Callable],
        figures: Callable[[float], dict] = lambda ms: {},
        timing: str = "eager",
        **fields,
    ) -> dict:
        """`setup()` builds the call to time (raising Skip when it cannot run); `figures(ms)` derives
        throughput figures from the median time. `timing`: "eager" (events around the calls), "graph"
        (replays of the call captured as a CUDA graph) or "host" (host time per call)."""
        if self.watch:
            self.watch.start()
        try:
            fn = setup()
            if timing == "graph":
                result = self.timer.graph(fn)
            elif timing == "host":
                result = host_ms(fn, self.device)
            else:
                result = self.timer(fn)
        except Skip as e:
            return self.add(case, implementation, shape, dtype, SKIPPED, str(e), timing=timing, **fields)
        except Exception as e:  # noqa: BLE001 - recorded; the stage reports failed rows at the end
            return self.add(
                case, implementation, shape, dtype, FAILED, f"{type(e).__name__}: {e}", timing=timing, **fields
            )
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.watch:
            fields.update(self.watch.stop())
        return self.add(
            case, implementation, shape, dtype, OK, None, timing=timing, **result, **figures(result["ms"]), **fields
        )


def record_id(r: dict) -> str:
    """A record's unique name: case/shape/dtype/implementation, and the timing when it is not eager."""
    timing = r.get("timing", "eager")
    return f"{r['case']}/{r['shape']}/{r['dtype']}/{r['implementation']}" + ("" if timing == "eager" else f"/{timing}")


def add_speedups(records: list[dict], reference: dict[str, list[str]]) -> None:
    """`speedup`: how many times faster than the case's reference (the first of `reference[case]` measured
    on the same shape, dtype and timing); 1.0 for the reference itself."""
    by_key = {
        (r["case"], r["shape"], r["dtype"], r.get("timing"), r["implementation"]): r
        for r in records
        if r["status"] == OK
    }
    for r in records:
        if r["status"] != OK:
            continue
        for ref_impl in reference.get(r["case"], []):
            ref = by_key.get((r["case"], r["shape"], r["dtype"], r.get("timing"), ref_impl))
            if ref is not None:
                r["speedup"] = ref["ms"] / r["ms"]
                r["reference"] = ref_impl
                break


def plot_rows(records: list[dict]) -> list[dict]:
    """One bar per measured row: its speed relative to the case's reference
    (what the bench stage's plot shows)."""
    return [
        {
            "benchmark": f"{r['case']} {r['shape']} {r['dtype']} | {r['implementation']}",
            "speedup": round(r["speedup"], 4),
            "ms": round(r["ms"], 4),
        }
        for r in records
        if r["status"] == OK and "speedup" in r
    ]
