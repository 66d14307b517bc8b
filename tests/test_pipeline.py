"""The DVC pipeline end to end on a tiny project: `dvc repro` runs, reruns nothing the second time, and
the MLflow runs it logged are found through a real `mlflow server`'s REST API."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from pipeline_helpers import digests, env_for, make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("proj"))
    out = run([sys.executable, "-m", "dvc", "repro"], proj, timeout=900)
    return proj, out.stdout


def test_dvc_repro_runs_the_pipeline(project):
    proj, log = project
    prep = json.loads((proj / "metrics" / "prepare.json").read_text())
    train = json.loads((proj / "metrics" / "train.json").read_text())
    assert prep["vocab_size"] > 10 and prep["train_tokens"] > prep["val_tokens"] > 0
    assert train["iterations"] == 30 and train["best_val_loss"] < 3.5
    assert train["tokens_per_sec"] > 0 and json.loads((proj / "out" / "ckpt.json").read_text())["device"] == "cpu"
    assert (proj / "out" / "ckpt.pt").is_file() and (proj / "plots" / "train_loss.csv").is_file()
    assert (proj / "mlflow.db").is_file()
    assert "Running stage 'train'" in log


def test_second_repro_does_nothing(project):
    proj, _ = project
    recorded = digests(proj, ["dvc.lock", "metrics", "bench", "plots"])
    out = run([sys.executable, "-m", "dvc", "repro"], proj, timeout=900)
    rerun = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert rerun == [], out.stdout  # bench too: it reruns when its code, params or checkpoint change
    assert digests(proj, ["dvc.lock", "metrics", "bench", "plots"]) == recorded
    # Asked to re-measure (README "Benchmarks"): bench alone reruns.
    out = run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "bench"], proj, timeout=900)
    rerun = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert rerun == ["Running stage 'bench':"], out.stdout


def test_params_error_stops_the_stage_with_the_key(project, tmp_path):
    proj, _ = project
    bad = tmp_path / "bad.yaml"
    bad.write_text((proj / "params.yaml").read_text().replace("learning_rate: 0.003", "learning_rate: -0.003"))
    out = run([sys.executable, "stages/train.py", "--params", str(bad)], proj, check=False)
    assert out.returncode == 2
    assert "train.learning_rate" in out.stderr and "Traceback" not in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(port: int, path: str, body: dict | None = None, query: str = "") -> dict:
    """POST `body` to an MLflow REST endpoint, or GET it with `query` when there is no body."""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}" + (f"?{query}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_mlflow_server_lists_the_pipeline_runs(project, tmp_path):
    proj, _ = project
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{proj / 'mlflow.db'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env_for(proj),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                exp = rest(port, "experiments/search", {"max_results": 10})
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError(
                        f"mlflow server did not come up: {server.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(1)
        ids = [e["experiment_id"] for e in exp["experiments"] if e["name"] == "gptcore"]
        assert ids, exp
        runs = rest(port, "runs/search", {"experiment_ids": ids, "max_results": 50})["runs"]
        by_stage = {}
        for r in runs:
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            by_stage[tags["dvc.stage"]] = (r, tags)
        assert {"prepare", "train"} <= set(by_stage)
        train_run, tags = by_stage["train"]
        assert len(tags["git.commit"]) >= 40
        params = {p["key"]: p["value"] for p in train_run["data"]["params"]}
        assert params["train.max_iters"] == "30" and params["model.n_embd"] == "32"
        hist = rest(port, "metrics/get-history", query=f"run_id={train_run['info']['run_id']}&metric_key=val_loss")
        steps = [m["step"] for m in hist["metrics"]]
        assert steps == [0, 10, 20, 30]
    finally:
        server.terminate()
        server.wait(timeout=30)
