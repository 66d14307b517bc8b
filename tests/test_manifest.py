"""Checkpoint manifests: a checkpoint with a manifest loads only with the bytes the manifest records; the
message of a refusal names the file and both hashes. (tests/test_versions.py runs the stages end to end.)"""

import json
import shutil
import subprocess

import pytest
import torch

from gptcore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gptcore.files import sha256_file
from gptcore.manifest import (
    ManifestMismatch,
    checkpoint_tags,
    find_manifest,
    main,
    manifest_path,
    verify_checkpoint,
    write_manifest,
)
from gptcore.model import GPT, GPTConfig
from gptcore.release import ReleaseError, release
from gptcore.transplant import TransplantError, check_weights, transplant

CONFIG = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    path = save_checkpoint(
        {"model_args": CONFIG.to_dict(), "model": model.state_dict(), "iter_num": 3, "params": {}},
        tmp_path / "out" / "ckpt.pt",
    )
    write_manifest(path, dvc_stage="train", mlflow_run_id="run123", git_commit="abc", iteration=3)
    return path


def tamper(path, offset=None):
    """Flip one byte: at `offset`, or inside the stored data of the first weights (the file stays loadable)."""
    data = bytearray(path.read_bytes())
    if offset is None:
        torch.manual_seed(0)
        offset = bytes(data).find(GPT(CONFIG).transformer.wte.weight.detach().numpy().tobytes()[:32]) + 4
        assert offset > 4
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_the_file_and_its_provenance(ckpt):
    m = json.loads(manifest_path(ckpt).read_text())
    assert manifest_path(ckpt).name == "ckpt.json"
    assert m["format"] == "gptcore-checkpoint/1" and m["file"] == "ckpt.pt" and m["sha256"] == sha256_file(ckpt)
    assert m["bytes"] == ckpt.stat().st_size and m["mlflow_run_id"] == "run123" and m["git_commit"] == "abc"
    assert m["dvc_stage"] == "train" and m["iteration"] == 3 and m["created"]
    assert load_checkpoint(ckpt)["iter_num"] == 3
    assert checkpoint_tags(ckpt) == {
        "checkpoint.sha256": m["sha256"],
        "checkpoint.run_id": "run123",
        "checkpoint.git_commit": "abc",
    }


def test_changed_bytes_are_refused_with_both_hashes(ckpt):
    expected = sha256_file(ckpt)
    tamper(ckpt)
    with pytest.raises(ManifestMismatch) as err:
        load_checkpoint(ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg and str(manifest_path(ckpt)) in msg
    assert f"expected {expected}" in msg and f"actual {sha256_file(ckpt)}" in msg
    assert isinstance(err.value, CheckpointError)  # the stages report it as a user error, exit 2
    assert "iter_num" in load_checkpoint(ckpt, verify=False)  # torch alone does not notice the changed weights
    assert main([str(ckpt)]) == 1


def test_truncated_file_names_the_sizes(ckpt):
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ManifestMismatch, match=r"size: expected [\d,]+ bytes, actual 1,000"):
        load_checkpoint(ckpt)


def test_no_manifest_loads_as_before_unless_one_is_required(ckpt):
    manifest_path(ckpt).unlink()
    assert find_manifest(ckpt) is None and load_checkpoint(ckpt)["iter_num"] == 3
    with pytest.raises(CheckpointError, match="no manifest"):
        verify_checkpoint(ckpt, require=True)
    assert verify_checkpoint(ckpt, expected_sha256=sha256_file(ckpt)) is None
    with pytest.raises(ManifestMismatch, match="recorded: expected 0000"):
        verify_checkpoint(ckpt, expected_sha256="0" * 64)


def test_an_unreadable_manifest_is_an_error(ckpt):
    manifest_path(ckpt).write_text("{not json")
    with pytest.raises(CheckpointError, match="ckpt.json cannot be read"):
        load_checkpoint(ckpt)


def test_a_renamed_copy_pairs_with_its_renamed_manifest(ckpt, tmp_path):
    shutil.copy(ckpt, tmp_path / "v1.pt")
    shutil.copy(manifest_path(ckpt), tmp_path / "v1.json")
    assert find_manifest(tmp_path / "v1.pt").run_id == "run123"
    assert main([str(tmp_path / "v1.pt")]) == 0
    tamper(tmp_path / "v1.pt")
    with pytest.raises(ManifestMismatch, match="v1.json recorded"):
        load_checkpoint(tmp_path / "v1.pt")


def test_transplanted_weights_are_checked_against_their_manifest(ckpt, tmp_path):
    manifest = transplant(ckpt, tmp_path / "cutile", CONFIG.vocab_size, provenance={"mlflow_run_id": "run456"})
    assert manifest["mlflow_run_id"] == "run456"
    assert manifest["source"]["mlflow_run_id"] == "run123" and manifest["source"]["git_commit"] == "abc"
    weights = tmp_path / "cutile" / "model.safetensors"
    assert find_manifest(weights).sha256 == manifest["weights"]["sha256"]
    assert checkpoint_tags(weights)["checkpoint.run_id"] == "run456"
    # another safetensors file in the folder is not the one manifest.json describes
    shutil.copy(weights, tmp_path / "cutile" / "other.safetensors")
    assert find_manifest(tmp_path / "cutile" / "other.safetensors") is None
    tamper(weights, offset=-8)
    with pytest.raises(TransplantError, match=f"expected {manifest['weights']['sha256']}, actual "):
        check_weights(tmp_path / "cutile", CONFIG.vocab_size)


def test_release_checks_its_arguments_before_anything_else(tmp_path):
    with pytest.raises(ReleaseError, match="not in a git repository"):
        release(["gptcore-char"], "v1.0.0", root=tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(ReleaseError, match="expected vMAJOR.MINOR.PATCH"):
        release(["gptcore-char"], "1.0", root=tmp_path)
