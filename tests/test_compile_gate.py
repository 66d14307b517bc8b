"""The ahead-of-time compile gate runs on a CPU-only machine: every cuTile kernel, for every signature
the model uses, compiles to a cubin for Hopper (sm_90) and Blackwell (sm_100).

Cold, the attention kernels take most of the time (results/cpu/compile-gate.csv: each job's seconds); cubins land in
cuTile's disk cache, keyed by the exact bytecode, so a rerun on unchanged kernels takes seconds and a
changed kernel always recompiles.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compile_gate_sm90_sm100():
    pytest.importorskip("cuda.tile", reason="cuda-tile[tileiras] is not installed")
    from gptcore.kernels.compile import jobs

    proc = subprocess.run(
        [sys.executable, "-m", "gptcore.kernels.compile", "--arch", "sm_90", "sm_100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"compile gate failed:\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    expected = jobs(["sm_90", "sm_100"])
    ok_lines = [line for line in out.splitlines() if line.startswith("OK ")]
    assert not [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(ok_lines) == len(expected), out
    for job in expected:  # one OK line per kernel, signature and architecture
        pattern = rf"^OK\s+{job.arch}\s+{re.escape(job.kernel)}\s+{re.escape(job.label)}\s"
        assert any(re.match(pattern, line) for line in ok_lines), f"no OK line for {job}"
    kernels = {job.kernel for job in expected}
    assert kernels == {
        "attention.fwd",
        "attention.bwd_dq",
        "attention.bwd_dkdv",
        "layernorm.fwd",
        "layernorm.bwd",
        "layernorm.colsum",
        "residual_layernorm.fwd",
        "residual_layernorm.bwd",
        "bias_gelu.fwd",
        "bias_gelu.bwd",
        "cross_entropy.fwd",
        "cross_entropy.bwd",
        "linear_cross_entropy.grad",
        "column_sums",
        "decode_linear",
        "decode_attention",
        "decode_attention.combine",
    }
    # sm_90's forward takes another block order from Tq = 2048 on: that variant is compiled too.
    assert any(job.arch == "sm_90" and job.label == "bfloat16 D=64 long" for job in expected)


@pytest.mark.parametrize(
    "n, chunk, expected",
    [
        (384, 128, (128, 3, False)),
        (768, 256, (256, 3, False)),
        (384, 256, (256, 2, True)),
        (512, 256, (256, 2, False)),
        (100, 256, (128, 1, True)),
        (1, 256, (1, 1, False)),
        (7, 256, (8, 1, True)),
        (1600, 256, (256, 7, True)),
    ],
)
def test_layernorm_forward_chunks(n, chunk, expected):
    """The LayerNorm forward covers a row with K chunks of one power-of-two width C, at most the tiles'
    chunk: together they cover every column, and only the last one may reach past the row (padded)."""
    pytest.importorskip("cuda.tile", reason="cuda-tile[tileiras] is not installed")
    from gptcore.kernels.layernorm import fwd_chunks

    c, k, pad_last = fwd_chunks(n, chunk)
    assert (c, k, pad_last) == expected
    assert c & (c - 1) == 0 and c <= chunk
    assert (k - 1) * c < n <= k * c
    assert pad_last == (k * c != n)


def test_every_gate_signature_comes_from_its_kernels_launch_spec():
    """Without compiling: each job of the full gate builds its kernel's own LaunchSpec (every argument named)
    and a signature from it, with the tiles of its architecture as the constants."""
    pytest.importorskip("cuda.tile", reason="cuda-tile[tileiras] is not installed")
    from gptcore.kernels import attention, layernorm
    from gptcore.kernels.compile import example_spec, jobs, signature

    for job in jobs(["sm_90", "sm_100"], full=True):
        spec = example_spec(job)
        spec.ordered_args()
        sig = signature(spec, job.aligned)
        assert sig.symbol.startswith(spec.name)
        if job.kernel == "attention.fwd":
            tiles = attention.tiles_for(job.arch, job.size)
            assert (spec.args["TILE_M"], spec.args["TILE_N"], spec.args["DROPOUT"]) == (
                tiles.fwd_m,
                tiles.fwd_n,
                job.dropout,
            )
            assert spec.args["SCHED"] == (tiles.fwd_sched_long if job.long else tiles.fwd_sched)
        if job.kernel == "layernorm.bwd":
            tiles = layernorm.tiles_for(job.arch, job.size)
            assert (spec.args["TILE_ROWS"], spec.args["HAS_W"]) == (tiles.bwd_rows, job.affine)
        if job.kernel.startswith("residual_layernorm."):
            assert spec.args["DROPOUT"] == job.dropout
            assert spec.args["HAS_X"] == (job.variant != "embedding")
            if job.kernel.endswith(".bwd"):
                assert spec.args["HAS_DXO"] == (job.variant != "final")
        if job.aligned:  # the aligned signature assumes more of the arrays than the plain one
            assert sig.symbol != signature(spec, False).symbol
