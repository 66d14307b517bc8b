"""Versioned checkpoints end to end on a tiny project: release v1 (tag + dvc push to the local remote), change
a param and release v2, then fetch v1 by its version (`dvc artifacts get`), by its revision (`dvc get`) and
from Python (`dvc.api.open`), find its MLflow run by the sha256, re-verify it, and refuse corrupted bytes.

One project serves every test (a module fixture): prepare + train + transplant twice take about a minute
and a half on a 2-core CPU; the fetches and checks after it take seconds each."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import make_project, run

from gptcore.checkpoint import CheckpointError, load_checkpoint
from gptcore.files import sha256_file
from gptcore.manifest import ManifestMismatch, find_manifest

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
RELEASE = [sys.executable, "-m", "gptcore.release"]


def commit(proj: Path, message: str) -> str:
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", message], proj)
    return run(["git", "rev-parse", "HEAD"], proj).stdout.strip()


def snapshot(proj: Path, commit_sha: str) -> dict:
    return {
        "commit": commit_sha,
        "manifest": json.loads((proj / "out" / "ckpt.json").read_text()),
        "cutile": json.loads((proj / "cutile" / "manifest.json").read_text()),
        "train": json.loads((proj / "metrics" / "train.json").read_text()),
    }


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    base = tmp_path_factory.mktemp("versions")
    proj = make_project(base / "gptcore")  # its default DVC remote: base/gptcore-dvc-remote (.dvc/config)
    remote = base / "gptcore-dvc-remote"

    run(DVC + ["repro", "transplant"], proj, timeout=900)  # prepare, train, transplant
    v1 = snapshot(proj, commit(proj, "v1: tiny model"))
    out = run(RELEASE + ["gptcore-char", "gptcore-char-cutile", "v1.0.0", "-m", "first tiny model"], proj, timeout=300)
    assert "tagged gptcore-char@v1.0.0" in out.stdout, out.stdout

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1e-3  # was 3e-3 (tests/pipeline_helpers.py TINY)
    params["train"]["min_lr"] = 1e-4
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(DVC + ["repro", "transplant"], proj, timeout=900)  # train and transplant rerun; prepare is cached
    v2 = snapshot(proj, commit(proj, "v2: lower learning rate"))
    run(RELEASE + ["gptcore-char", "gptcore-char-cutile", "v2.0.0"], proj, timeout=300)

    # From here on every fetch must come from the remote: the project's own cache is gone.
    shutil.rmtree(proj / ".dvc" / "cache")
    return {"base": base, "proj": proj, "remote": remote, "v1": v1, "v2": v2}


def mlflow_client(proj: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")


def test_release_tags_the_commit_and_pushes_to_the_local_remote(released):
    proj, v1, v2 = released["proj"], released["v1"], released["v2"]
    assert v1["manifest"]["sha256"] != v2["manifest"]["sha256"]
    for version, snap in (("v1.0.0", v1), ("v2.0.0", v2)):
        for name in ("gptcore-char", "gptcore-char-cutile"):
            tag = f"{name}@{version}"
            assert run(["git", "cat-file", "-t", tag], proj).stdout.strip() == "tag"  # annotated: dvc/gto need it
            assert run(["git", "rev-parse", f"{tag}^{{commit}}"], proj).stdout.strip() == snap["commit"]
        note = run(["git", "tag", "-l", "--format=%(contents)", f"gptcore-char@{version}"], proj).stdout
        assert snap["manifest"]["sha256"] in note and snap["manifest"]["mlflow_run_id"] in note
    assert any(released["remote"].rglob("*")), "dvc push stored nothing in the local remote"

    # The manifest: the checkpoint's bytes and where they came from.
    m = v1["manifest"]
    assert m["format"] == "gptcore-checkpoint/1" and m["file"] == "ckpt.pt" and m["dvc_stage"] == "train"
    assert m["bytes"] > 0 and len(m["sha256"]) == 64 and len(m["git_commit"].removesuffix("-dirty")) == 40
    assert m["model_config"]["n_embd"] == 32 and m["iterations"] == 30 and 0 <= m["iteration"] <= 30
    assert m["best_val_loss"] == v1["train"]["best_val_loss"] and len(m["data_sha256"]) == 64
    made_by = mlflow_client(released["proj"]).get_run(m["mlflow_run_id"]).data.tags  # the train run of v1
    assert made_by["dvc.stage"] == "train" and made_by["checkpoint.sha256"] == m["sha256"]
    c = v1["cutile"]  # the transplant manifest: its own run and commit, and the run that made its source
    assert c["mlflow_run_id"] and c["dvc_stage"] == "transplant" and c["git_commit"]
    assert c["source"]["sha256"] == m["sha256"] and c["source"]["mlflow_run_id"] == m["mlflow_run_id"]

    listing = run(RELEASE + ["--list"], proj, timeout=300).stdout
    for snap, version in ((v1, "v1.0.0"), (v2, "v2.0.0")):
        line = next(ln for ln in listing.splitlines() if ln.startswith(f"gptcore-char@{version}"))
        assert snap["manifest"]["sha256"] in line and snap["manifest"]["mlflow_run_id"] in line, listing


def test_release_refuses_an_uncommitted_workspace_and_a_taken_version(released):
    proj = released["proj"]
    taken = run(RELEASE + ["gptcore-char", "v1.0.0"], proj, check=False, timeout=300)
    assert taken.returncode == 2 and "gptcore-char@v1.0.0 exists already" in taken.stderr
    params = proj / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("seed: 1337", "seed: 7", 1))
    try:
        dirty = run(RELEASE + ["gptcore-char", "v3.0.0"], proj, check=False, timeout=300)
    finally:
        params.write_text(original)
    assert dirty.returncode == 2 and "uncommitted changes: params.yaml" in dirty.stderr, dirty.stderr
    assert "gptcore-char@v3.0.0" not in run(["git", "tag"], proj).stdout


def test_fetch_v1_by_version_and_revision_matches_its_mlflow_run_and_reverifies(released, tmp_path):
    proj, v1, v2 = released["proj"], released["v1"], released["v2"]
    sha = v1["manifest"]["sha256"]

    # by version: the artifact and its manifest, into one folder (the names kept, so the loader finds it)
    by_version = tmp_path / "by-version"
    by_version.mkdir()
    run(
        DVC + ["artifacts", "get", str(proj), "gptcore-char", "--rev", "v1.0.0", "-o", str(by_version)],
        tmp_path,
        timeout=300,
    )
    run(
        DVC + ["get", str(proj), "out/ckpt.json", "--rev", "gptcore-char@v1.0.0", "-o", str(by_version)],
        tmp_path,
        timeout=300,
    )
    # by revision: the v1 commit, renamed on the way (v1.pt + v1.json stay a pair)
    by_rev = tmp_path / "by-rev"
    by_rev.mkdir()
    for src, dst in (("out/ckpt.pt", "v1.pt"), ("out/ckpt.json", "v1.json")):
        run(DVC + ["get", str(proj), src, "--rev", v1["commit"], "-o", str(by_rev / dst)], tmp_path, timeout=300)

    fetched = by_version / "ckpt.pt"
    assert sha256_file(fetched) == sha256_file(by_rev / "v1.pt") == sha != v2["manifest"]["sha256"]
    assert find_manifest(by_rev / "v1.pt").sha256 == sha
    ck = load_checkpoint(fetched)  # checked against by-version/ckpt.json
    assert ck["iter_num"] == v1["manifest"]["iteration"] and ck["data_sha256"] == v1["manifest"]["data_sha256"]

    # the MLflow run that made it: by the run id in the manifest, and by its sha256 tag
    client = mlflow_client(proj)
    train_run = client.get_run(v1["manifest"]["mlflow_run_id"])
    assert train_run.data.tags["checkpoint.sha256"] == sha and train_run.data.tags["dvc.stage"] == "train"
    assert train_run.data.tags["git.commit"] == v1["manifest"]["git_commit"]
    exp = client.get_experiment_by_name("gptcore")
    by_sha = f"tags.`checkpoint.sha256` = '{sha}'"
    made = client.search_runs([exp.experiment_id], f"{by_sha} and tags.`dvc.stage` = 'train'")
    assert [r.info.run_id for r in made] == [train_run.info.run_id]
    used = client.search_runs([exp.experiment_id], f"{by_sha} and tags.`dvc.stage` = 'transplant'")
    assert len(used) == 1 and used[0].data.tags["checkpoint.run_id"] == train_run.info.run_id
    assert used[0].data.tags["weights.sha256"] == v1["cutile"]["weights"]["sha256"]

    # re-verify the fetched file: on a CPU the cuTile levels are skipped (with the reason) and it still passes
    out_dir = tmp_path / "verify"
    proc = run(
        [sys.executable, "stages/verify.py", "--checkpoint", str(fetched), "--out", str(out_dir)],
        proj,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out_dir / "verify.json").read_text())
    assert report["source_sha256"] == sha and report["status"] in ("pass", "incomplete")
    if not torch.cuda.is_available():
        assert report["status"] == "incomplete" and report["L1_kernels"]["status"] == "skipped"
    verify_run = client.get_run(report["mlflow_run_id"])
    assert verify_run.data.tags["checkpoint.sha256"] == sha
    assert verify_run.data.tags["checkpoint.run_id"] == train_run.info.run_id
    assert verify_run.data.tags["dvc.stage"] == "verify" and verify_run.data.tags["git.commit"]


def test_dvc_api_open_reads_a_version_from_python(released):
    import dvc.api

    from gptcore.release import load_version

    proj, v1 = released["proj"], released["v1"]
    with dvc.api.open("out/ckpt.pt", repo=str(proj), rev="gptcore-char@v1.0.0", mode="rb") as f:
        import hashlib

        assert hashlib.sha256(f.read()).hexdigest() == v1["manifest"]["sha256"]
    ck, manifest = load_version("gptcore-char", "v1.0.0", repo=str(proj))
    assert manifest.sha256 == v1["manifest"]["sha256"] and manifest.run_id == v1["manifest"]["mlflow_run_id"]
    assert ck["model_args"]["n_embd"] == 32 and ck["iter_num"] == v1["manifest"]["iteration"]
    weights, manifest = load_version("gptcore-char-cutile", "v1.0.0", repo=str(proj))
    assert manifest.sha256 == v1["cutile"]["weights"]["sha256"]
    assert torch.equal(weights["transformer.wpe.weight"], ck["model"]["transformer.wpe.weight"])


def test_fresh_clone_pulls_a_version_from_the_default_remote(released):
    """A clone beside the project finds the default remote (../gptcore-dvc-remote) as it is; checking out
    the version's tag and `dvc pull` give back v1's exact bytes, with the pipeline up to date."""
    proj, v1 = released["proj"], released["v1"]
    clone = released["base"] / "clone"
    run(["git", "clone", "-q", str(proj), str(clone)], released["base"])
    run(["git", "checkout", "-q", "gptcore-char@v1.0.0"], clone)
    run(DVC + ["pull", "--with-deps", "transplant"], clone, timeout=300)  # the stages this test ran
    assert sha256_file(clone / "out" / "ckpt.pt") == v1["manifest"]["sha256"]
    load_checkpoint(clone / "out" / "ckpt.pt")  # and its manifest came along
    status = run(DVC + ["status", "--with-deps", "--json", "transplant"], clone, timeout=300).stdout
    assert json.loads(status) == {}, status
    # the location is configurable per clone without editing .dvc/config
    moved = released["base"] / "moved-remote"
    shutil.copytree(released["remote"], moved)
    run(DVC + ["remote", "modify", "--local", "storage", "url", str(moved)], clone)
    assert str(moved) in run(DVC + ["remote", "list"], clone).stdout
    (clone / "out" / "ckpt.pt").unlink()
    shutil.rmtree(clone / ".dvc" / "cache")
    run(DVC + ["pull", "out/ckpt.pt"], clone, timeout=300)
    assert sha256_file(clone / "out" / "ckpt.pt") == v1["manifest"]["sha256"]


def flip_tensor_bytes(path: Path, tensor: torch.Tensor) -> None:
    """Change a few bytes inside `tensor`'s stored data: the file stays a loadable zip/safetensors file."""
    raw = path.read_bytes()
    needle = tensor.contiguous().numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at > 0, "tensor data not found in the file"
    data = bytearray(raw)
    for i in range(at + 8, at + 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_corrupted_fetched_checkpoint_is_refused(released, tmp_path):
    proj, v1 = released["proj"], released["v1"]
    # whole folders at the version: each file with its manifest
    run(
        DVC + ["get", str(proj), "out", "--rev", "gptcore-char@v1.0.0", "-o", str(tmp_path / "v1")],
        tmp_path,
        timeout=300,
    )
    run(
        DVC + ["get", str(proj), "cutile", "--rev", "gptcore-char-cutile@v1.0.0", "-o", str(tmp_path / "v1-cutile")],
        tmp_path,
        timeout=300,
    )
    ckpt = tmp_path / "v1" / "ckpt.pt"
    good = load_checkpoint(ckpt)
    flip_tensor_bytes(ckpt, good["model"]["transformer.h.0.mlp.c_fc.weight"])
    actual = sha256_file(ckpt)

    # torch alone would not notice: the zip is intact, only the numbers changed
    silently = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not torch.equal(
        silently["model"]["transformer.h.0.mlp.c_fc.weight"], good["model"]["transformer.h.0.mlp.c_fc.weight"]
    )
    with pytest.raises(ManifestMismatch) as err:
        load_checkpoint(ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg and f"expected {v1['manifest']['sha256']}" in msg and f"actual {actual}" in msg
    assert isinstance(err.value, CheckpointError)

    # the stages refuse it too, with that message and no traceback
    proc = run(
        [sys.executable, "stages/verify.py", "--checkpoint", str(ckpt), "--out", str(tmp_path / "v")],
        proj,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 2 and f"actual {actual}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run(
        [sys.executable, "stages/sample.py", "--checkpoint", str(ckpt), "--max-new-tokens", "4"],
        proj,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 2 and f"expected {v1['manifest']['sha256']}" in proc.stderr, proc.stderr
    check = run([sys.executable, "-m", "gptcore.manifest", str(ckpt)], proj, check=False)
    assert check.returncode == 1 and "sha256 differs" in check.stderr

    # the cuTile weights: refused before they are read
    weights = tmp_path / "v1-cutile" / "model.safetensors"
    from safetensors.torch import load_file

    flip_tensor_bytes(weights, load_file(str(weights))["transformer.wpe.weight"])
    proc = run(
        [sys.executable, "stages/verify.py", "--checkpoint", str(weights), "--out", str(tmp_path / "w")],
        proj,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 2 and f"expected {v1['cutile']['weights']['sha256']}" in proc.stderr, proc.stderr
    assert f"actual {sha256_file(weights)}" in proc.stderr
