"""Benchmarks on a CPU: the PyTorch rows are measured (positive figures), every row that needs a GPU is
`skipped` with its reason, and the stage writes bench.json, the plot DVC renders, and no failed rows."""

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import FAST_STAGES, ROOT, env_for, make_project, run, tiny_params_dict

from gptcore import neighbours
from gptcore.bench import kernels as kernel_bench
from gptcore.bench import model as model_bench
from gptcore.bench.timing import Recorder, Timer, add_speedups
from gptcore.model import GPT, GPTConfig
from gptcore.neighbours import registered
from gptcore.train_step import EagerTrainStep, make_train_step


def test_timer_reports_median_and_spread_and_loops_short_calls():
    timer = Timer(torch.device("cpu"), warmup=1, repeats=3, min_repeat_ms=5.0)
    t = timer(lambda: time.sleep(0.001))
    assert 1.0 <= t["ms"] < 50 and t["ms_min"] <= t["ms"] <= t["ms_max"]
    assert t["repeats"] == 3 and t["calls_per_repeat"] >= 2  # 1 ms calls looped to last >= 5 ms


def test_rows_on_cpu_measure_pytorch_and_skip_the_gpu_rows():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    checkpoint = {"model_args": config.to_dict(), "model": GPT(config).state_dict()}
    rec = Recorder(torch.device("cpu"), Timer(torch.device("cpu"), 1, 2, 0.0), log=lambda _: None)
    kernel_bench.kernel_rows(rec, config, ["model"], 2, 1, [torch.float32])
    model_bench.train_step_rows(rec, checkpoint, 2, torch.float32, ["torch", "cutile"])
    model_bench.inference_rows(rec, checkpoint, torch.float32, ["torch", "cutile"], [1, 2], 4, True, 4)
    add_speedups(rec.records, {**kernel_bench.REFERENCE, **model_bench.REFERENCE})
    rows = {(r["case"], r["shape"], r["implementation"]): r for r in rec.records}

    for key in [
        ("attention_fwd", "B2xH2xT16xD16", "sdpa-math"),
        ("attention_fwd_bwd", "B2xH2xT16xD16", "sdpa-flash"),
        ("layernorm_fwd_bwd", "N32xC32", "torch"),
        ("train_step", "B2xT16", "torch eager"),
        ("prefill", "B2xT16", "torch"),
        ("decode", "B1xP4+12", "torch kv_cache"),
        ("decode", "B2xP4+12", "torch kv_cache"),
    ]:
        r = rows[key]
        assert r["status"] == "ok" and r["ms"] > 0 and r["speedup"] > 0, r
    assert rows[("attention_fwd", "B2xH2xT16xD16", "sdpa-math")]["tflops"] > 0
    assert rows[("layernorm_fwd", "N32xC32", "torch")]["gbps"] > 0
    assert rows[("train_step", "B2xT16", "torch eager")]["tokens_per_sec"] > 0
    decode = rows[("decode", "B1xP4+12", "torch kv_cache")]
    assert decode["tokens_per_sec"] > 0 and decode["speedup_vs_uncached"] > 0 and decode["same_tokens_as_uncached"]
    uncached = rows[("decode", "B1xP8+4", "torch uncached")]  # 4 tokens from the middle of the 12
    assert uncached["status"] == "ok" and uncached["new_tokens"] == 4
    assert uncached["ms_per_token"] == pytest.approx(uncached["ms"] / 4)
    assert decode["speedup_vs_uncached"] == pytest.approx(uncached["ms_per_token"] / decode["ms_per_token"])

    for key in [
        ("attention_fwd", "B2xH2xT16xD16", "cutile"),
        ("layernorm_fwd", "N32xC32", "cutile"),
        ("train_step", "B2xT16", "cutile"),
        ("prefill", "B1xT16", "cutile"),
        ("decode", "B1xP4+12", "cutile kv_cache+cuda_graph"),
    ]:
        assert rows[key]["status"] == "skipped" and "CUDA GPU" in rows[key]["reason"], rows[key]
    assert "CUDA only" in rows[("attention_fwd", "B2xH2xT16xD16", "sdpa-cudnn")]["reason"]
    assert "CUDA graphs need a CUDA device" in rows[("decode", "B1xP4+12", "torch kv_cache+cuda_graph")]["reason"]
    for impl in ("torch compile", "torch compile reduce-overhead", "cutile compile reduce-overhead"):
        assert "torch.compile row off" in rows[("train_step", "B2xT16", impl)]["reason"], impl
    for impl in ("torch eager+graph", "cutile+graph"):  # the step captured as a CUDA graph: CUDA only
        r = rows[("train_step", "B2xT16", impl)]
        assert r["status"] == "skipped" and "CUDA graphs need a CUDA device" in r["reason"], r
    assert not [r for r in rec.records if r["status"] == "failed"]
    for r in rec.records:  # every record says where and with what it was measured
        assert r["device"] and r["torch"] == torch.__version__ and r["cuda_tile"]


def test_the_bench_times_the_training_step_of_the_trainer(monkeypatch):
    """bench's train-step row is built by gptcore.train_step.make_train_step, the Trainer's step factory,
    with the bench's settings (one micro-batch, gradient clipping at 1.0), and the call it times trains."""
    built = []

    def recording(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        built.append((kwargs, step))
        return step

    monkeypatch.setattr(model_bench, "make_train_step", recording)
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    checkpoint = {"model_args": config.to_dict(), "model": GPT(config).state_dict()}
    timed = model_bench.train_step(checkpoint, "torch", torch.device("cpu"), torch.float32, 2)
    [(settings, step)] = built
    assert isinstance(step, EagerTrainStep)
    assert {k: settings[k] for k in ("mode", "micro_steps", "batch_size", "block_size", "grad_clip")} == {
        "mode": "eager",
        "micro_steps": 1,
        "batch_size": 2,
        "block_size": 16,
        "grad_clip": 1.0,
    }
    before = {name: t.clone() for name, t in step.model.state_dict().items()}
    loss = timed()
    assert bool(torch.isfinite(loss)) and loss.item() > 0
    assert any(not torch.equal(t, before[name]) for name, t in step.model.state_dict().items())


def test_dvc_stage_reruns_when_its_inputs_change_and_declares_its_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    b = stages["bench"]
    assert "always_changed" not in b  # `dvc repro` on an unchanged project runs nothing (test_pipeline)
    assert "${bench.checkpoint}" in b["deps"] and "gptcore/stages/bench.py" in b["deps"] and b["params"] == ["bench"]
    assert any("metrics/bench.json" in m for m in b["metrics"])
    plot = next(p["plots/bench.csv"] for p in b["plots"] if "plots/bench.csv" in p)
    assert (plot["x"], plot["y"], plot["cache"]) == ("speedup", "benchmark", False)
    s = stages["sample"]
    assert any("samples/samples.txt" in o for o in s["outs"]) and any("metrics/sample.json" in m for m in s["metrics"])
    assert any("bench/records.json" in o for o in b["outs"])  # every row; the metrics file holds the headline


@pytest.mark.slow
def test_bench_stage_on_cpu(tmp_path):
    proj = make_project(
        tmp_path / "proj",
        bench={
            "kernel_shapes": ["model"],
            "model_batch": 2,
            "decode_batch_sizes": [1],
            "warmup": 1,
            "repeats": 2,
            "min_repeat_ms": 0.0,
        },
    )
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    (proj / "out").mkdir()
    torch.save({"model_args": config.to_dict(), "model": GPT(config).state_dict()}, proj / "out" / "ckpt.pt")
    env = {**env_for(proj), "GPTCORE_MLFLOW": "off"}  # the GPU machine has no MLflow: this must work
    out = run([sys.executable, "stages/bench.py", "--repeats", "3"], proj, env=env)
    assert "failed" not in out.stderr

    m = json.loads((proj / "metrics" / "bench.json").read_text())
    saved = json.loads((proj / "bench" / "records.json").read_text())
    assert saved["environment"]["device"] and saved["environment"]["torch"] == torch.__version__
    records = saved["records"].values()
    measured = [r for r in records if r["status"] == "ok"]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {r["case"] for r in measured} == {
        "attention_fwd",
        "attention_fwd_bwd",
        "layernorm_fwd",
        "layernorm_fwd_bwd",
        "train_step",
        "prefill",
        "decode",
    }
    assert all(r["ms"] > 0 and r["repeats"] == 3 for r in measured)  # --repeats overrode params.yaml
    cutile = [r for r in records if r["implementation"].startswith("cutile")]
    # kernels 4, train_step 4 (eager, compiled, compiled reduce-overhead, +graph), prefill 1, decode 3
    assert len(cutile) == 4 + 4 + 1 + 3 and all(r in skipped and r["reason"] for r in cutile)
    assert m["torch_decode_ms"] > 0 and m["torch_step_ms"] > 0 and "x the tokens/s of uncached" in out.stdout
    assert not any(k.startswith("cutile") for k in m)  # every cuTile row was skipped: no figure, not a zero
    assert all(r["device"] and r["torch"] == torch.__version__ and r["commit"] for r in records)

    plot = (proj / "plots" / "bench.csv").read_text().splitlines()
    assert plot[0] == "benchmark,speedup,ms" and len(plot) == len(measured) + 1
    shown = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], proj, check=False, env=env)
    bars = json.loads(shown.stdout)["data"]["plots/bench.csv"][0]["content"]["data"]["values"]
    assert len(bars) == len(measured) and all(float(b["speedup"]) > 0 for b in bars)


# A process that registers itself as a gptcore stage (as stage.tracked does), unless its stage is "", and then
# sleeps or keeps a CPU busy.
STAGE_STAND_IN = """
import contextlib, sys, time
from pathlib import Path
from gptcore.neighbours import registered
with registered(sys.argv[1], Path(sys.argv[2])) if sys.argv[1] else contextlib.nullcontext():
    print("registered", flush=True)
    while True:
        if sys.argv[3] == "sleep":
            time.sleep(1)
"""


@contextmanager
def stand_ins(runtime: Path, *how: tuple[str, str, str]):
    """Stand-in processes, each (stage, folder, "sleep" | "busy"), registered in `runtime` while the block runs;
    killed at its end, so they cannot remove their entries (as a killed stage cannot)."""
    env = {**os.environ, "GPTCORE_RUNTIME_DIR": str(runtime), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", STAGE_STAND_IN, *args], env=env, stdout=subprocess.PIPE, text=True)
        for args in how
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "registered\n"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_running_stages_are_those_registered_and_alive(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCORE_RUNTIME_DIR", str(tmp_path))
    with registered("bench", tmp_path):  # this process's own entry is not a neighbour
        with stand_ins(tmp_path, ("train", "/exp/a", "sleep"), ("sample", "/exp/b", "sleep")) as procs:
            found = neighbours.running_stages()
            assert [(r.pid, r.stage, r.folder) for r in found] == sorted(
                (p.pid, stage, folder) for p, (stage, folder) in zip(procs, [("train", "/exp/a"), ("sample", "/exp/b")])
            )
            assert str(found[0]) == f"{found[0].stage} (pid {found[0].pid}) in {found[0].folder}"
        # killed: their entries stay behind, and are ignored and removed by the next look
        assert len(list(tmp_path.glob("*.json"))) == 3 and neighbours.running_stages() == []
        assert [p.name for p in tmp_path.glob("*.json")] == [f"{os.getpid()}.json"]
        # a live PID that is not the process that registered (started at another time): not a stage
        (tmp_path / "1.json").write_text(json.dumps({"pid": 1, "stage": "train", "folder": "/x", "started": 0.0}))
        assert neighbours.running_stages() == []
    assert list(tmp_path.glob("*.json")) == []  # ended: its entry is gone


def test_a_stage_that_cannot_register_says_so_and_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("GPTCORE_RUNTIME_DIR", str(tmp_path / "not-a-folder"))
    ran = False
    with registered("train", tmp_path):
        ran = True
    assert ran and capsys.readouterr().out.startswith(f"warning: cannot register this train run in {tmp_path}")


def test_a_row_measured_beside_a_stage_and_busy_cpus_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCORE_RUNTIME_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    lines = []
    rec = Recorder(cpu, Timer(cpu, 1, 1, 1000 * neighbours.MIN_WINDOW_S), log=lines.append, watch=neighbours.Watch())
    busy = [("train", "/exp/a", "busy")] + [("", "", "busy")] * ((os.cpu_count() or 1) - 1)
    with stand_ins(tmp_path, *busy) as procs:
        row = rec.measure("sleep", "python", "1ms", "none", lambda: lambda: time.sleep(0.001))
    assert row["status"] == "ok" and row["disturbed"].startswith(f"train (pid {procs[0].pid}) in /exp/a; ")
    share = re.search(r"other processes kept (\d+)% of the (\d+) CPUs busy", row["disturbed"])
    assert share and int(share[1]) > 100 * neighbours.BUSY_SHARE and int(share[2]) == os.cpu_count(), row
    assert lines[-1].endswith("ms  ! disturbed")
    (warning,) = [w for w in neighbours.warnings(rec.records) if "train" in w]
    assert warning.startswith(f"warning: 1 of 1 rows measured while train (pid {procs[0].pid}) in /exp/a ran: ")
    assert row["neighbours"] == [f"train (pid {procs[0].pid}) in /exp/a"] and row["others_cpu"] > neighbours.BUSY_SHARE

    quiet = rec.measure("sleep", "python", "1ms again", "none", lambda: lambda: time.sleep(0.001))
    assert quiet["neighbours"] == []  # the stand-ins are gone (the CPUs may be busy with other work)


@pytest.mark.slow
def test_the_bench_stage_flags_rows_measured_while_another_stage_ran(tmp_path):
    """Two experiments of `dvc queue start -j 2` run in copies of the project of their own: the bench of one
    sees the other's train through the machine-wide registry, and says so in the records, metrics and log."""
    proj = tmp_path / "exp-bench"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(bench=FAST_STAGES["bench"])))
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    (proj / "out").mkdir()
    torch.save({"model_args": config.to_dict(), "model": GPT(config).state_dict()}, proj / "out" / "ckpt.pt")
    runtime = tmp_path / "runtime"
    env = {**env_for(proj), "PYTHONPATH": str(ROOT), "GPTCORE_MLFLOW": "off", "GPTCORE_RUNTIME_DIR": str(runtime)}
    other = str(tmp_path / "exp-train")
    with stand_ins(runtime, ("train", other, "sleep")) as (train,):
        out = run([sys.executable, "-m", "gptcore", "bench"], proj, env=env)
    neighbour = f"train (pid {train.pid}) in {other}"

    records = json.loads((proj / "bench" / "records.json").read_text())["records"].values()
    measured = [r for r in records if r["status"] == "ok"]
    assert measured and all(r["disturbed"].startswith(neighbour) for r in measured)
    assert json.loads((proj / "metrics" / "bench.json").read_text())["disturbed_rows"] == len(measured)
    assert out.stdout.count("! disturbed") == len(measured)
    assert f"warning: {len(measured)} of {len(measured)} rows measured while {neighbour} ran: " in out.stderr


def test_a_reduce_overhead_step_keeps_its_gradients_allocated_and_trains_as_eager():
    """reduce-overhead's step (mark_steps) gives the same losses and weights as the plain eager step over micro-batches,
    and its gradients stay allocated tensors, zeroed after each step: a None gradient would make autograd keep a
    backward output from the graphs' memory as .grad, which the next micro-step's replay overwrites."""
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    x = torch.randint(40, (3, 2, 16), generator=torch.Generator().manual_seed(1))
    runs = []
    for mark_steps in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
        step = EagerTrainStep(
            model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), dtype=torch.float32, micro_steps=3,
            grad_clip=1.0, distributed=False, mark_steps=mark_steps,
        )  # fmt: skip
        losses = [step.step(x, torch.roll(x, -1, dims=2), 1e-2).item() for _ in range(2)]
        runs.append((losses, model, [p.grad for p in model.parameters()]))
    (plain_losses, plain_model, plain_grads), (losses, model, grads) = runs
    assert losses == plain_losses and all(g is None for g in plain_grads)
    assert all(g is not None and not g.any() for g in grads)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q)
