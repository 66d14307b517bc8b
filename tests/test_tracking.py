"""Offline stage records (GPTCORE_MLFLOW=off, as on the GPU machine, or a store that failed) imported into an
MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import tiny_params

from gptcore.files import sha256_file
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
        ('{"run_name": "t", "params": {}, "metrics": [], "tags": {}, "models": {}}', r"models is \{\}, not a list"),
        (
            '{"run_name": "t", "params": {}, "metrics": [], "tags": {}, "models": [{"name": "m"}]}',
            r"models\[0\] lacks \['step', 'params', 'tags', 'metrics'\]",
        ),
        (
            '{"run_name": "t", "params": {}, "metrics": [], "tags": {}, "models": [{"name": "m", "step": 1, '
            '"params": {"a": 1}, "tags": {}, "metrics": {}}]}',
            r"models\[0\]\.params is \{'a': 1\}, not an object of strings",
        ),
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


@pytest.mark.slow
def test_a_train_run_logs_its_curves_and_its_checkpoint_as_a_logged_model(tmp_path):
    """MLflow as its users expect from MLflow 3: the train loss, lr and tokens/s at every log interval, the
    val loss at every evaluation, and the best checkpoint as the run's logged model, which names the DVC
    artifact's path and sha256 and holds no copy of the weights."""
    from mlflow import MlflowClient
    from pipeline_helpers import DVC, make_project, run

    proj = make_project(tmp_path / "proj")
    run(DVC + ["repro", "train"], proj, timeout=900)
    p = tiny_params().train  # 30 iterations, log_interval 5, eval_interval 10
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptcore")
    (train,) = client.search_runs([experiment.experiment_id], "tags.`dvc.stage` = 'train'")
    run_id = train.info.run_id

    def steps(key: str) -> list[int]:
        return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    logged = list(range(0, p.max_iters, p.log_interval))
    assert steps("train_loss") == steps("lr") == steps("tokens_per_sec")[:-1] == logged  # + the run's median
    assert steps("val_loss") == list(range(0, p.max_iters + 1, p.eval_interval))

    manifest = json.loads((proj / "out" / "ckpt.json").read_text())
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.name == "gptcore-char" and model.model_type == "gpt2" and model.status == "READY"
    assert model.source_run_id == run_id == manifest["mlflow_run_id"]  # run -> model -> run, and weights -> run
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == [
        (model.model_id, manifest["iteration"])
    ]
    assert model.tags["checkpoint.path"] == "out/ckpt.pt" and model.tags["dvc.artifact"] == "gptcore-char"
    assert model.tags["checkpoint.sha256"] == manifest["sha256"] == sha256_file(proj / "out" / "ckpt.pt")
    assert model.tags["checkpoint.manifest"] == "out/ckpt.json"
    assert model.params["n_embd"] == "32" and int(model.params["n_params"]) == manifest["n_params"]
    best = json.loads((proj / "metrics" / "train.json").read_text())["best_val_loss"]
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("best_val_loss", best, manifest["iteration"])]
    stored = [f for f in (proj / "mlruns").rglob("*") if f.is_file()]
    assert {f.name for f in stored} >= {"MLmodel", "loss.png", "ckpt.json"}
    assert manifest["sha256"] not in {sha256_file(f) for f in stored}  # the weights stay DVC's


def test_an_offline_logged_model_is_created_by_import(tmp_path, monkeypatch):
    """GPTCORE_MLFLOW=off: the record keeps the logged model, and `import` makes it the imported run's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTCORE_MLFLOW", "off")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tags = {"checkpoint.path": "out/ckpt.pt", "checkpoint.sha256": "ab" * 32}
    with stage_run("train", Params(), ["train"]) as run:
        run.log_metrics({"val_loss": 2.5}, step=20)
        run.log_model("gptcore-char", step=20, params={"n_layer": 2}, tags=tags, metrics={"best_val_loss": 2.5})
    (record_path,) = (tmp_path / "mlflow-offline").glob("train-*.json")
    (model_record,) = json.loads(record_path.read_text())["models"]
    assert model_record["params"] == {"n_layer": "2"} and model_record["step"] == 20

    run_id = import_offline(record_path, Params())
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (model,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert model.name == "gptcore-char" and model.source_run_id == run_id
    assert model.tags["checkpoint.sha256"] == "ab" * 32 and model.params == {"n_layer": "2"}
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("best_val_loss", 2.5, 20)]
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
