"""Runs a person can compare: the README's `dvc exp show` command fits a 120-column terminal with the params
that differ and the headline metrics, `python -m gptcore compare` prints the experiments side by side, every
stage's metrics file is committed (a baseline for `dvc metrics diff`), and each stage lists in dvc.yaml the
params its code reads."""

from __future__ import annotations

import importlib
import json
import shlex
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import DVC, FAST_STAGES, ROOT, env_for, make_project, run

from gptcore import compare, stage
from gptcore.bench.model import headline_metrics as bench_headline
from gptcore.params import Params, Section
from gptcore.verify.common import FAIL, PASS, SKIPPED, Result
from gptcore.verify.report import headline_metrics as verify_headline
from gptcore.verify.runner import Verification

STAGES = ["prepare", "train", "transplant", "verify", "bench", "sample"]
HEADLINE = ["best_val_loss", "final_val_loss", "ms_per_iter", "passed", "failed", "skipped"]


def documented_exp_show() -> list[str]:
    """The `dvc exp show` command of the README's Experiments block, as a shell would split it."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("\n## Experiments\n") :]
    block = block[block.index("```bash\n") : block.index("```\n", block.index("```bash\n") + 8)]
    (line,) = [x for x in block.splitlines() if x.startswith("dvc exp show")]
    return shlex.split(line.split("  #")[0])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed baseline and two experiments (train.seed 1 and 2) of the tiny project, named by DVC."""
    proj = make_project(tmp_path_factory.mktemp("compare") / "proj", **FAST_STAGES)
    env = {**env_for(proj), "GPTCORE_MLFLOW": "off"}  # the MLflow store is not what this compares
    run(DVC + ["repro"], proj, env=env, timeout=900)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)
    for seed in (1, 2):
        run(DVC + ["exp", "run", "--temp", "-S", f"train.seed={seed}"], proj, env=env, timeout=900)
    (baseline,) = [b for b in json.loads(run(DVC + ["exp", "show", "--json"], proj).stdout) if b["rev"] != "workspace"]
    experiments = {}
    for exp in baseline["experiments"]:
        data = exp["revs"][0]["data"]
        seed = data["params"]["params.yaml"]["data"]["train"]["seed"]
        metrics = {path: m["data"] for path, m in data["metrics"].items()}
        experiments[seed] = {"name": exp["name"], "metrics": metrics}
    assert sorted(experiments) == [1, 2]
    return proj, baseline["name"], experiments


@pytest.mark.slow
def test_documented_exp_show_fits_120_columns(project):
    proj, _, experiments = project
    cmd = documented_exp_show()
    out = run(cmd, proj, env={**env_for(proj), "COLUMNS": "120"}).stdout
    lines = out.rstrip("\n").splitlines()
    assert "…" not in out and "..." not in out, out
    assert max(len(line) for line in lines) <= 120, out
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == ["Experiment", *HEADLINE, "train.seed"], out  # the one param that differs, no others
    for seed, exp in experiments.items():
        (row,) = [line for line in lines if f"[{exp['name']}]" in line]
        train, verify = exp["metrics"]["metrics/train.json"], exp["metrics"]["metrics/verify.json"]
        shown = [format(train[k], ".5g") for k in HEADLINE[:3]] + [str(verify[k]) for k in HEADLINE[3:]]
        assert row.split()[-len(HEADLINE) - 1 :] == [*shown, str(seed)], (row, shown)
    assert "!" not in out  # the baseline's metrics files are committed: no row misses one
    for path in (proj / "metrics").glob("*.json"):  # what --drop '[^.]*$' relies on: no metric name has a dot
        assert all("." not in k and not isinstance(v, dict) for k, v in json.loads(path.read_text()).items()), path


@pytest.mark.slow
def test_compare_prints_the_experiments_side_by_side(project):
    proj, baseline, experiments = project
    out = run([sys.executable, "-m", "gptcore", "compare"], proj / "data").stdout  # from below the root, too
    header, rule, *rows = out.rstrip("\n").splitlines()
    assert header.split("  ")[0] == "experiment" and set(rule) == {"-", " "}
    assert [h.strip() for h in header.split("  ") if h.strip()] == [
        "experiment",
        "train.seed",
        "best val loss",
        "final val loss",
        "ms/iter",
        "verify",
    ]
    assert rows[0].startswith(f"{baseline} (baseline)") and " 1337 " in rows[0]
    for seed, exp in experiments.items():
        (row,) = [r for r in rows if r.startswith(exp["name"] + " ")]
        train, verify = exp["metrics"]["metrics/train.json"], exp["metrics"]["metrics/verify.json"]
        assert row.split()[1:5] == [
            str(seed),
            f"{train['best_val_loss']:.4f}",
            f"{train['final_val_loss']:.4f}",
            f"{train['ms_per_iter']:.2f}",
        ]
        total = verify["passed"] + verify["failed"] + verify["skipped"]
        assert row.endswith(f"incomplete ({verify['passed']}/{total} passed)")  # no GPU: levels skipped
    assert len(rows) == 3


@pytest.mark.slow
def test_compare_says_why_there_is_nothing_to_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert compare.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} is not in a DVC project (no .dvc folder here or above)"), err
    for cmd in (["git", "init", "-q"], DVC + ["init", "-q"]):
        run(cmd, tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "init"], tmp_path)
    assert compare.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} has no experiments of HEAD to compare"), err


def test_bench_and_verify_headlines_are_few_flat_numbers():
    """With a GPU's rows and levels: the metrics files hold a handful of short names, no nesting (the README's
    `dvc exp show --drop` tells metrics from params by the dot), the rest stays in the records."""
    rows = [
        {"status": "ok", "case": "train_step", "implementation": "torch eager", "ms": 16.0},
        {"status": "ok", "case": "train_step", "implementation": "cutile", "ms": 20.0},
        {"status": "ok", "case": "train_step", "implementation": "cutile+graph", "ms": 7.0},
        {"status": "ok", "case": "decode", "implementation": "torch kv_cache", "batch": 16, "ms_per_token": 9.0},
        {"status": "ok", "case": "decode", "implementation": "torch kv_cache", "batch": 1, "ms_per_token": 0.3},
        {"status": "skipped", "case": "decode", "implementation": "cutile kv_cache", "batch": 1, "reason": "x"},
    ]
    profiles = {"torch": {"total_ms": 7.5, "mfu": 0.3, "kernels": 515}, "cutile": {"skipped": "no GPU"}}
    assert bench_headline(rows, profiles) == {
        "torch_step_ms": 16.0,
        "cutile_step_ms": 20.0,
        "torch_decode_ms": 0.3,
        "cutile_speedup": 0.8,
        "torch_kernel_ms": 7.5,
        "torch_mfu": 0.3,
    }
    levels = [
        Result("compile", "compile gate", PASS, figures={"jobs": 26}),
        Result("L1", "kernels", SKIPPED, reason="no GPU"),
        Result("L3", "logits", PASS, figures={"kl_mean": 1e-4, "top1_agreement": 0.995, "logits_max_abs_diff": 0.01}),
        Result("L5", "gradients", FAIL, figures={"grad_rel_max": 0.2, "worst_parameter": "lm_head.weight"}),
    ]
    verification = Verification(None, "cutile", "cuda", "bfloat16", "float16", levels)
    assert verify_headline(verification) == {
        "passed": 2,
        "failed": 1,
        "skipped": 1,
        "kl_mean": 1e-4,
        "top1": 0.995,
        "grad_rel_max": 0.2,
    }


def cache_false_paths(stages: dict) -> list[str]:
    """Every metrics file, plot and output that dvc.yaml keeps out of the DVC cache: git holds those."""
    paths = []
    for s in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in s.get(kind, []):
                if isinstance(item, dict):
                    paths += [path for path, options in item.items() if options.get("cache") is False]
    return paths


def test_every_stage_metrics_file_is_committed():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: {listed.stderr.strip()}")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = cache_false_paths(stages)
    assert {f"metrics/{name}.json" for name in STAGES} <= set(paths)
    missing = sorted(set(paths) - set(listed.stdout.splitlines()))
    assert not missing, f"not in git (`git add` them with dvc.lock): {missing}"


@pytest.mark.slow
def test_each_stage_lists_the_params_its_code_reads(tmp_path, monkeypatch):
    """Run every stage in process with each params field read recorded (after loading: validation reads
    across sections): dvc.yaml lists each one the stage reads, itself or its section, and every single key it
    lists is read. mlflow.* says where records go, not what the outputs are, so no stage depends on it."""
    proj = make_project(tmp_path / "proj", **FAST_STAGES)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("GPTCORE_MLFLOW", "off")
    section_of = {field.annotation: name for name, field in Params.model_fields.items()}
    reads: set[str] = set()
    recording = []

    def traced(self, name):
        section = section_of.get(type(self))
        if recording and section and name in type(self).model_fields:
            reads.add(f"{section}.{name}")
        return object.__getattribute__(self, name)

    load = stage.load

    def loaded(*args, **kwargs):
        params = load(*args, **kwargs)
        recording.append(True)
        return params

    monkeypatch.setattr(Section, "__getattribute__", traced)
    monkeypatch.setattr(stage, "load", loaded)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: s.get("params", []) for name, s in stages.items()}
    for name in STAGES:
        reads.clear()
        recording.clear()
        assert importlib.import_module(f"gptcore.stages.{name}").main([]) == 0, name
        read = {key for key in reads if not key.startswith("mlflow.")}
        assert read, name
        uncovered = sorted(k for k in read if k not in declared[name] and k.split(".")[0] not in declared[name])
        assert not uncovered, f"{name} reads {uncovered}: list them in dvc.yaml"
        unread = sorted(k for k in declared[name] if "." in k and k not in read)
        assert not unread, f"{name} lists {unread} in dvc.yaml but never reads them"
