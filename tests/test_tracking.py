"""Offline stage records (GPTCORE_MLFLOW=off, as on the GPU machine) imported into an MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.params import Params
from gptcore.tracking import import_offline, stage_run

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


def test_import_refuses_a_file_that_is_not_a_record(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"best_val_loss": 1.0}))
    with pytest.raises(ValueError, match=r"lacks \['run_name', 'params', 'metrics', 'tags'\]"):
        import_offline(bad, Params())
    with pytest.raises(ValueError, match="not a readable offline MLflow record"):
        import_offline(tmp_path / "missing.json", Params())
