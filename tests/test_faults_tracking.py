"""Tracking faults of issue 27, run as the issue's table runs them on a project after the quickstart: an MLflow
store that cannot be used costs a stage nothing (one warning line, records offline, exit 0), `tracking import`
refuses a garbage file in one line, and a copied project logs its artifacts into its own folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import DVC, FAST_STAGES, digests, make_project, run

pytestmark = pytest.mark.slow
# The good artifacts a fault must leave as they were (the sample stage rewrites samples.txt from the same
# seed; its metrics hold timings, bench's outputs are remeasured).
GOOD = [
    "data/train.bin",
    "data/val.bin",
    "data/meta.json",
    "data/tokenizer.json",
    "out/ckpt.pt",
    "out/ckpt.json",
    "out/last.pt",
    "cutile/model.safetensors",
    "cutile/manifest.json",
    "reports/verify.json",
    "samples/samples.txt",
    "metrics/train.json",
    "metrics/verify.json",
    "plots/train_loss.csv",
]
WARNING = re.compile(
    r"warning: MLflow store (?P<store>\S+) cannot be used \((?P<reason>[^)]*)\): sample's records go offline to "
    r"(?P<path>\S+); import them later with python -m gptcore\.tracking import (?P=path)"
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("faults") / "proj", **FAST_STAGES)
    run(DVC + ["repro"], proj, timeout=900)
    return proj


@pytest.fixture
def project(quickstart, tmp_path):
    """A copy of the quickstart project (cp -a) for one test to break."""
    return Path(shutil.copytree(quickstart, tmp_path / "proj", symlinks=True))


def sample_with_a_broken_store(project: Path, *args: str) -> tuple[re.Match, dict]:
    """`python -m gptcore sample ARGS`: it exits 0, writes samples.txt anew, leaves every good artifact as it
    was and says on one stderr line that its records went offline; returns that line and the record."""
    before = digests(project, GOOD + ["mlflow.db"])
    written = (project / "samples" / "samples.txt").stat().st_mtime_ns
    out = run([sys.executable, "-m", "gptcore", "sample", *args], project, timeout=300)
    (line,) = out.stderr.strip().splitlines()
    warning = WARNING.fullmatch(line)
    assert warning, line
    assert digests(project, GOOD + ["mlflow.db"]) == before
    assert (project / "samples" / "samples.txt").stat().st_mtime_ns > written  # written as usual
    record = json.loads(Path(warning["path"]).read_text())
    assert Path(warning["path"]).parent == project / "mlflow-offline"
    assert record["status"] == "FINISHED" and record["params"]["sample.num_samples"] == 1
    assert record["metrics"][0]["tokens_generated"] == 20 and record["artifacts"] == ["samples.txt"]
    return warning, record


def test_an_unreachable_server_is_named_and_the_records_go_offline(project):
    start = time.monotonic()
    warning, record = sample_with_a_broken_store(project, "--set", "mlflow.tracking_uri=http://127.0.0.1:9/")
    assert time.monotonic() - start < 60  # bounded retries, not MLflow's minutes
    assert (warning["store"], warning["reason"]) == ("http://127.0.0.1:9/", "Connection refused")
    assert record["params"]["mlflow.tracking_uri"] == "http://127.0.0.1:9/"

    # Later, with a store that works (the project's own), the record imports as the run it would have been.
    out = run([sys.executable, "-m", "gptcore.tracking", "import", warning["path"]], project)
    run_id = out.stdout.split("imported as run ")[1].split()[0]
    from mlflow import MlflowClient

    imported = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert imported.info.status == "FINISHED" and imported.data.params["sample.num_samples"] == "1"
    assert imported.data.metrics["tokens_generated"] == 20 and imported.data.tags["dvc.stage"] == "sample"


def test_a_damaged_store_is_named_and_the_records_go_offline(project):
    (project / "mlflow.db").write_bytes(os.urandom(100_000))  # head -c 100000 /dev/urandom > mlflow.db
    warning, _ = sample_with_a_broken_store(project)
    assert (warning["store"], warning["reason"]) == (str(project / "mlflow.db"), "file is not a database")


GOOD_RECORD = {"run_name": "sample", "params": {}, "metrics": [{"step": 0, "loss": 1.0}], "tags": {}}


@pytest.mark.parametrize(
    "content,reason",
    [
        (os.urandom(3000), "not UTF-8 text"),
        (b"ROMEO: not JSON\n", "not JSON (Expecting value at line 1 column 1)"),
        (b"[1, 2]", "a JSON list, not an object"),
        (json.dumps({**GOOD_RECORD, "metrics": [{"step": 0, "loss": "low"}]}).encode(), "metrics[0].loss is 'low'"),
    ],
    ids=["random-bytes", "not-json", "json-list", "wrong-shape"],
)
def test_import_refuses_a_garbage_file_and_imports_nothing(project, content, reason):
    good, garbage = project / "good.json", project / "garbage.json"
    good.write_text(json.dumps(GOOD_RECORD))
    garbage.write_bytes(content)
    before = digests(project)
    out = run([sys.executable, "-m", "gptcore.tracking", "import", str(good), str(garbage)], project, check=False)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: {garbage}: not an offline MLflow record: {reason}"), line
    assert line.endswith("; nothing imported") and "imported as run" not in out.stdout
    assert digests(project) == before  # the store too: not even the good record went in


def test_a_copied_project_logs_into_its_own_folder(quickstart, tmp_path):
    copy = Path(shutil.copytree(quickstart, tmp_path / "copy", symlinks=True))  # cp -a repo copy
    original, good = digests(quickstart), digests(copy, GOOD)
    out = run(DVC + ["repro", "-f", "-s", "bench"], copy, timeout=900)  # re-measure: bench logs artifacts
    assert digests(quickstart) == original and digests(copy, GOOD) == good  # nothing written into the original
    root = (copy / "mlruns" / "gptcore").as_uri()
    moved = f"note: MLflow experiment 'gptcore' now keeps its artifacts in {root} (copied or moved from "
    assert f"{moved}{(quickstart / 'mlruns' / 'gptcore').as_uri()})" in out.stdout.splitlines()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptcore")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert experiment.artifact_location == root
    assert all(r.info.artifact_uri.startswith(root + "/") for r in runs)  # the copied runs point at their copies
    bench = runs[0]
    assert bench.data.tags["dvc.stage"] == "bench" and bench.info.status == "FINISHED"
    logged = sorted(p.name for p in (copy / "mlruns" / "gptcore" / bench.info.run_id / "artifacts").iterdir())
    assert logged == ["bench.json", "bench.png", "records.json"]
    (model,) = client.search_logged_models([experiment.experiment_id])  # train's checkpoint, re-pointed too
    assert model.artifact_location.startswith(root + "/") and (copy / "mlruns" / "gptcore" / "models").is_dir()
