"""Recording work as a CUDA graph: the one capture helper of the graphed training step
(gptcore/train_graph.py), the decode steps (gptcore/sampling.py) and the bench's graph-replay timings
(gptcore/bench/timing.py).

A capture runs on a side stream (capturing the default stream is not allowed), ordered after the work
already queued on the current stream, which then waits for it. Work run eagerly before a capture, to set
up what must not happen inside it (kernels compiled, cuBLAS workspaces and similar, which are per stream),
runs on that same stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """Issue the block's work on `stream`, after the work queued on the current stream; the current stream
    then waits for it."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def capture(
    fn: Callable[[], object],
    stream: torch.cuda.Stream,
    *,
    warmup: int = 0,
    pool=None,
    generators: Iterable[torch.Generator] = (),
) -> torch.cuda.CUDAGraph:
    """`fn()` recorded as a CUDA graph on `stream`, after `warmup` eager calls of it there.

    Thread-local capture mode: unsafe CUDA calls are refused on this thread, while autograd's backward
    thread (which launches the backward kernels) may do its own setup. If `fn` raises, the capture is
    ended so the stream is usable again, and `fn`'s error is the one raised. `pool`: another graph's memory
    pool to share (graphs that never run at the same time). `generators`: the generators `fn` draws from
    besides the default CUDA one, registered so that every replay draws fresh numbers from them."""
    if warmup:
        with on_stream(stream):
            for _ in range(warmup):
                fn()
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with on_stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            fn()
        except BaseException:
            with contextlib.suppress(Exception):  # the capture is invalid anyway; fn's error says why
                graph.capture_end()
            raise
        graph.capture_end()
    return graph
