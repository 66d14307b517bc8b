"""The tile sweeps (gptcore.bench.tune) on a CPU: every sweep path runs with the kernel launch replaced by a
recorder that checks each LaunchSpec against its kernel (every argument named, each of a kind the compile
gate can type), so a tuner that passes a config where a kernel wants something else fails on CI. The timing
is replaced too: the recorder's "times" are made up, so the test also checks that the fastest candidate of
each part is the one chosen."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("cuda.tile", reason="cuda-tile is not installed")

from gptcore.bench import tune  # noqa: E402
from gptcore.bench.timing import OK  # noqa: E402
from gptcore.kernels import attention, bias_gelu, column_sums, compile, layernorm  # noqa: E402
from gptcore.kernels import residual_layernorm as residual  # noqa: E402
from gptcore.kernels.spec import parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class FakeRecorder:
    """Stands in for bench.timing.Recorder: runs each candidate's call once and gives it a made-up time."""

    def __init__(self, ms_of):
        self.device = torch.device("cpu")
        self.records = []
        self.ms_of = ms_of

    def measure(self, case, implementation, shape, dtype, setup, timing="eager", **fields):
        setup()()
        rec = dict(case=case, implementation=implementation, shape=shape, dtype=dtype, status=OK, timing=timing)
        rec.update(fields, ms=self.ms_of(case, fields["config"]))
        self.records.append(rec)
        return rec


@pytest.fixture
def launches(monkeypatch):
    """Every launch as (kernel name, its compile-time constants, the kernel object), checked like the gate
    checks it; on a CPU the device facts are an H100's."""
    recorded = []

    def record(spec, device_index):
        spec.ordered_args()  # every argument the kernel takes, by name, and nothing else
        compile.signature(spec)  # each one a tensor, a float, an int or a constant
        constants = {name: spec.args[name] for name, constant in parameters(spec.body) if constant}
        recorded.append((spec.name, constants, spec.kernel))

    tiled = (attention, layernorm, residual, bias_gelu)
    for module in tiled:
        monkeypatch.setattr(module, "launch", record)
        monkeypatch.setattr(module, "arch_of", lambda index: "sm_90")
        module._table_tiles.cache_clear()
    monkeypatch.setattr(column_sums, "launch", record)
    for module in (layernorm, residual, bias_gelu):
        monkeypatch.setattr(module, "sm_count", lambda index: 132)
    monkeypatch.setattr(tune, "prewarm", lambda jobs: [e for e in map(tune.warm_one, jobs) if e])
    yield recorded
    for module in tiled:
        module._table_tiles.cache_clear()


def fake_ms(case, config):
    """A made-up time per candidate, so that the test knows the winner: smaller tiles are "faster"."""
    return sum(v for k, v in config.items() if k.endswith(("_m", "_n", "_rows"))) + config.get("fwd_occ", 0) / 10


def test_attention_sweep_launches_every_candidate_as_configured(launches):
    rec = FakeRecorder(fake_ms)
    chosen = tune.tune_attention(rec, shape=(1, 2, 64, 64), dtype=torch.bfloat16, arch="sm_90")
    candidates = len(tune.ATTN_FWD) + len(tune.ATTN_DQ) + len(tune.ATTN_DKV)
    assert len(rec.records) == candidates and all(r["status"] == OK for r in rec.records)
    by_kernel = {}
    for name, constants, kernel in launches:
        by_kernel.setdefault(name, []).append((constants, kernel))
    # each forward candidate launched with its own tiles and occupancy (once to compile, once timed)
    for c in tune.ATTN_FWD:
        constants = dict(D=64, TILE_M=c["fwd_m"], TILE_N=c["fwd_n"], SCHED=c["fwd_sched"], DROPOUT=False)
        assert (constants, attention.fwd_kernel(c["fwd_occ"])) in by_kernel["attn_fwd_kernel_body"], c
    dq_launches = [(consts["TILE_M"], consts["TILE_N"], kern) for consts, kern in by_kernel["attn_bwd_dq_kernel_body"]]
    for c in tune.ATTN_DQ:
        assert (c["dq_m"], c["dq_n"], attention.bwd_dq_kernel(c["dq_occ"])) in dq_launches
    dkv = [(consts["TILE_M"], consts["TILE_N"], kern) for consts, kern in by_kernel["attn_bwd_dkdv_kernel_body"]]
    for c in tune.ATTN_DKV:
        assert (c["dkv_m"], c["dkv_n"], attention.bwd_dkdv_kernel(c["dkv_occ"])) in dkv
    # the fastest of each part, by the made-up times
    base = attention.tiles_for("sm_90", 64)
    fastest = {
        part: min(cands, key=lambda c: fake_ms("", vars(replace(base, **c))))
        for part, cands in (("fwd", tune.ATTN_FWD), ("dq", tune.ATTN_DQ), ("dkv", tune.ATTN_DKV))
    }
    assert (chosen.fwd_m, chosen.fwd_n, chosen.fwd_occ) == tuple(
        fastest["fwd"][k] for k in ("fwd_m", "fwd_n", "fwd_occ")
    )
    assert (chosen.dq_m, chosen.dq_n) == (fastest["dq"]["dq_m"], fastest["dq"]["dq_n"])
    assert (chosen.dkv_m, chosen.dkv_n) == (fastest["dkv"]["dkv_m"], fastest["dkv"]["dkv_n"])


@pytest.mark.parametrize("width", [384, 768])
def test_layernorm_sweep_launches_every_candidate_as_configured(launches, width):
    rec = FakeRecorder(fake_ms)
    chosen = tune.tune_layernorm(rec, shape=(64, width), dtype=torch.bfloat16, arch="sm_90")
    assert len(rec.records) == len(tune.LN_FWD) + len(tune.LN_BWD)
    fwd = [(consts, kern) for name, consts, kern in launches if name == "ln_fwd_kernel_body"]
    bwd = [(consts, kern) for name, consts, kern in launches if name == "ln_bwd_kernel_body"]
    for c in tune.LN_FWD:
        assert any(
            consts["TILE_ROWS"] == c["fwd_rows"]
            and consts["LATENCY"] == c["fwd_latency"]
            and kern is layernorm.fwd_kernel(c["fwd_occ"], c["fwd_warps"])
            for consts, kern in fwd
        ), c
    for c in tune.LN_BWD:
        assert any(
            consts["TILE_ROWS"] == c["bwd_rows"]
            and consts["DEFER"] == c["bwd_defer"]
            and kern is layernorm.bwd_kernel(c["bwd_occ"], c["bwd_warps"])
            for consts, kern in bwd
        ), c
    assert any(name == "ln_colsum_kernel_body" for name, _, _ in launches)  # the weight and bias gradients
    base = layernorm.tiles_for("sm_90", width)
    best_fwd = min(tune.LN_FWD, key=lambda c: fake_ms("", vars(replace(base, **c))))
    assert chosen.fwd_rows == best_fwd["fwd_rows"] and chosen.fwd_occ == best_fwd["fwd_occ"]


def test_fused_kernel_sweeps_launch_every_candidate_as_configured(launches):
    """The residual LayerNorm and bias + GELU sweeps: each candidate's tiles reach its kernel, the backward's
    column sums follow, and the fastest (made-up) candidate of each part is chosen."""
    rec = FakeRecorder(fake_ms)
    chosen = tune.tune_residual_layernorm(rec, shape=(64, 384), dtype=torch.bfloat16, arch="sm_90")
    assert len(rec.records) == len(tune.RESIDUAL_FWD) + len(tune.RESIDUAL_BWD)
    fwd = [(c, k) for name, c, k in launches if name == "adl_fwd_kernel_body"]
    bwd = [(c, k) for name, c, k in launches if name == "adl_bwd_kernel_body"]
    for c in tune.RESIDUAL_FWD:
        assert any(
            consts["TILE_ROWS"] == c["fwd_rows"] and consts["DROPOUT"] and kern is residual.fwd_kernel(c["fwd_occ"])
            for consts, kern in fwd
        ), c
    for c in tune.RESIDUAL_BWD:
        assert any(
            consts["TILE_ROWS"] == c["bwd_rows"] and kern is residual.bwd_kernel(c["bwd_occ"]) for consts, kern in bwd
        ), c
    assert any(name == "colsum_kernel_body" for name, _, _ in launches)
    base = residual.tiles_for("sm_90", 384)
    best = min(tune.RESIDUAL_BWD, key=lambda c: fake_ms("", vars(replace(base, **c))))
    assert chosen.bwd_rows == best["bwd_rows"]

    launches.clear()

    def gelu_ms(case, config):  # forward: fewest rows (16, 256) wins; backward: fewest columns (64, 64)
        part = case.rsplit(".", 1)[1]
        return config[f"{part}_rows"] + config[f"{part}_cols"] / 1000 if part == "fwd" else config["bwd_cols"]

    rec = FakeRecorder(gelu_ms)
    chosen = tune.tune_bias_gelu(rec, shape=(64, 1536), dtype=torch.bfloat16, arch="sm_90")
    assert len(rec.records) == 2 * len(tune.GELU)
    for c in tune.GELU:
        for name, part in (("gelu_fwd_kernel_body", "fwd"), ("gelu_bwd_kernel_body", "bwd")):
            assert any(
                n == name and consts["TILE_ROWS"] == c[f"{part}_rows"] and consts["TILE_COLS"] == c[f"{part}_cols"]
                for n, consts, _ in launches
            ), (name, c)
    assert (chosen.fwd_rows, chosen.fwd_cols, chosen.bwd_rows, chosen.bwd_cols) == (16, 256, 64, 64)


def test_a_spec_that_misnames_an_argument_is_refused():
    spec = compile.example_spec(compile.CompileJob("attention.fwd", "sm_90", "bfloat16", 64))
    broken = replace(spec, args={**spec.args, "TILE_Q": spec.args["TILE_M"]})
    with pytest.raises(TypeError, match="unknown \\['TILE_Q'\\]"):
        broken.ordered_args()
    del broken.args["TILE_M"]
    with pytest.raises(TypeError, match="missing \\['TILE_M'\\]"):
        broken.ordered_args()


def test_kernels_never_import_bench():
    """The kernels are measured by gptcore.bench, never the other way round."""
    offenders = []
    for path in sorted((ROOT / "gptcore" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offenders += [f"{path.name}: {name}" for name in names if name.startswith("gptcore.bench")]
    assert not offenders
