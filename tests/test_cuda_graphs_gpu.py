"""The one CUDA-graph capture helper (gptcore/cuda_graphs.py): warm-up calls, then a recording that
replays on new inputs; a failing capture raises its own error and leaves the stream usable; graphs share a
memory pool and draw fresh numbers from registered generators. Skipped where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from gptcore.cuda_graphs import capture

pytestmark = pytest.mark.gpu


def test_capture_warms_up_then_records_what_replays_on_new_inputs():
    device = torch.device("cuda")
    x, out = torch.ones(4, device=device), torch.zeros(4, device=device)
    calls = []

    def double():
        calls.append(1)
        out.copy_(x * 2)

    graph = capture(double, torch.cuda.Stream(device), warmup=2)
    assert len(calls) == 3  # two eager calls, then the recorded one
    x.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert out.tolist() == [6.0] * 4


def test_a_failing_capture_raises_its_error_and_leaves_the_stream_usable():
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    out = torch.zeros(4, device=device)

    def broken():
        out.add_(1.0)
        raise RuntimeError("broken step")

    with pytest.raises(RuntimeError, match="broken step"):
        capture(broken, stream)
    graph = capture(lambda: out.add_(1.0), stream)  # the same stream records again
    graph.replay()
    torch.cuda.synchronize()
    assert out.tolist() == [1.0] * 4  # the failed recording never ran


def test_graphs_share_a_pool_and_draw_fresh_numbers_from_registered_generators():
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    generator = torch.Generator(device=device).manual_seed(0)
    out = torch.zeros(8, device=device)
    draw = capture(lambda: out.exponential_(1, generator=generator), stream, warmup=1, generators=[generator])
    double = capture(lambda: out.mul_(2.0), stream, pool=draw.pool())
    draw.replay()
    first = out.clone()
    draw.replay()
    second = out.clone()
    double.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, second)  # each replay draws anew
    assert torch.equal(out, second * 2)
