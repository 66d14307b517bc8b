"""Offline stage records (GPTCORE_MLFLOW=off, as on the GPU machine, or a store that failed) imported into an
MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.params import Params
from gptcore.tracking import RecordError, import_offline, stage_run

ROOT = Path(__file__).resolve().parents[1]


def test_offline_record_imports_with_its_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # offline records go to the working directory's mlflow-offline/
    monkeypatch.setenv("GPTCORE_MLFLOW", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params()
    with stage_run("train", params, ["train"]) as run:
        for it, loss in ((0, 4.2), (250, 2.1), (500, 1.7)):
            run.log_metrics({"val_loss": loss, "lr": 1e-3}, step=it)
        run.log_metrics({"best_val_loss": 1.7})
    (record,) = (tmp_path / "mlflow-offline").glob("train-*.json")
    assert json.loads(record.read_text())["status"] == "FINISHED"

    # A fresh process imports it, as a user would: python -m gptcore.tracking import <file>
    (tmp_path / "params.yaml").write_text("{}\n")
    out = subprocess.run(
        [sys.executable, "-m", "gptcore.tracking", "import", str(record), "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split("imported as run ")[1].split()[0]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "train" and run.data.tags["offline.imported"] == "true"
    assert run.data.tags["dvc.stage"] == "train" and run.data.params["train.backend"] == "torch"
    curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(curve) == [(0, 4.2), (250, 2.1), (500, 1.7)]
    assert run.data.metrics["best_val_loss"] == pytest.approx(1.7)


@pytest.mark.parametrize(
    "content,message",
    [
        (json.dumps({"best_val_loss": 1.0}), r"lacks \['run_name', 'params', 'metrics', 'tags'\]"),
        (b"\x80\x81 bytes", r"not UTF-8 text \(byte 0x80 at byte offset 0 \(invalid start byte\)\)"),
        ("run_name: train\n", r"not JSON \(Expecting value at line 1 column 1\)"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"run_name": "t", "params": [], "metrics": [], "tags": {}}', r"params is \[\], not an object"),
        ('{"run_name": "t", "params": {}, "metrics": [{"step": "a"}], "tags": {}}', "metrics\\[0\\].step is 'a'"),
        ('{"run_name": "t", "params": {}, "metrics": [{"loss": true}], "tags": {}}', "metrics\\[0\\].loss is True"),
        ('{"run_name": "t", "params": {}, "metrics": [], "tags": {}, "status": "OK"}', "status is 'OK', not one of"),
    ],
)
def test_import_refuses_a_file_that_is_not_a_record(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RecordError, match=message + ".*; nothing imported$"):
        import_offline(bad, Params())
    with pytest.raises(RecordError, match=r"cannot read it \(No such file or directory\)"):
        import_offline(tmp_path / "missing.json", Params())
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store was opened


def test_a_store_that_fails_during_the_run_sends_every_record_offline(tmp_path, monkeypatch, capsys):
    """The store goes away after the run began: the stage goes on, the one warning names the store and the
    run that holds part of the records, and the offline file holds all of them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GPTCORE_MLFLOW", raising=False)
    with stage_run("train", Params(), ["train"]) as run:
        run.log_metrics({"val_loss": 4.2}, step=0)

        def gone(*args, **kwargs):
            raise MlflowException("API request to http://tracking/ failed\nmore detail")

        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", gone)
        monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", gone)
        run.log_metrics({"val_loss": 2.1}, step=250)
        run.set_tags({"after": "failure"})
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]  # MLflow's own log
    (record_path,) = (tmp_path / "mlflow-offline").glob("train-*.json")
    assert err == [
        f"warning: MLflow store {tmp_path / 'mlflow.db'} failed during the run (API request to http://tracking/ "
        f"failed): train's records (run {run.run_id} holds part of them) go offline to {record_path}; import them "
        f"later with python -m gptcore.tracking import {record_path}"
    ]
    record = json.loads(record_path.read_text())
    assert [row["val_loss"] for row in record["metrics"]] == [4.2, 2.1] and record["status"] == "FINISHED"
    assert record["tags"]["after"] == "failure" and record["params"]["train.backend"] == "torch"
