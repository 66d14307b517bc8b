"""Checkpoint manifests: the JSON file beside a checkpoint that says what it is and where it came from.

    out/ckpt.pt                 out/ckpt.json          train stage, format gptcore-checkpoint/1
    cutile/model.safetensors    cutile/manifest.json   transplant stage, format gptcore-transplant/1
    anything/<name>.<ext>       anything/<name>.json   a fetched copy: `dvc get ... -o v1.pt` + `-o v1.json`

A manifest records the checkpoint's sha256 and size, the MLflow run that made it, the git commit the code
ran at and the DVC stage; the train manifest also the model config, the data's sha256, the best
validation loss and its iteration. The MLflow run carries the same sha256 as its `checkpoint.sha256` tag,
so either side leads to the other.

Loading a checkpoint that has a manifest (`gptcore.checkpoint.load_checkpoint`, the transplant's
safetensors reader, and through them the transplant, verify, bench and sample stages) first compares the
file's sha256 with the manifest's and refuses a mismatch, naming the file and both hashes.

    python -m gptcore.manifest out/ckpt.pt cutile/model.safetensors     # check files against their manifests
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptcore.errors import CheckpointError
from gptcore.files import atomic_write_text, sha256_file

FORMAT = "gptcore-checkpoint/1"
TRANSPLANT_FORMAT = "gptcore-transplant/1"  # gptcore/transplant.py writes these (its FORMAT)
TRANSPLANT_MANIFEST = "manifest.json"


class ManifestMismatch(CheckpointError):
    """A checkpoint whose bytes are not the ones its manifest records."""


@dataclass
class Manifest:
    path: Path  # the manifest file
    data: dict  # its content
    sha256: str  # the checkpoint's sha256 it records
    size: int | None  # the checkpoint's size in bytes it records, when it does

    @property
    def run_id(self) -> str | None:
        return self.data.get("mlflow_run_id")

    @property
    def git_commit(self) -> str | None:
        return self.data.get("git_commit")


def manifest_candidates(checkpoint: str | Path) -> list[Path]:
    """Where a checkpoint's manifest may be, first match wins: `<stem>.json` beside it (the train stage's
    out/ckpt.json, or a renamed fetched copy), then for safetensors the transplant's manifest.json."""
    checkpoint = Path(checkpoint)
    found = [checkpoint.with_suffix(".json")]
    if checkpoint.suffix == ".safetensors":
        found.append(checkpoint.parent / TRANSPLANT_MANIFEST)
    return [p for p in found if p != checkpoint]


def manifest_path(checkpoint: str | Path) -> Path:
    """The manifest a stage writes for `checkpoint`: `<stem>.json` beside it."""
    return Path(checkpoint).with_suffix(".json")


def parse_manifest(data, checkpoint_name: str, source: str, strict_name: bool) -> Manifest | None:
    """The recorded sha256 (and size) of `checkpoint_name` in a manifest's content, or None when the content
    is not a gptcore manifest for that file."""
    if not isinstance(data, dict):
        return None
    fmt = data.get("format")
    if fmt == FORMAT and isinstance(data.get("sha256"), str):
        return Manifest(Path(source), data, data["sha256"], data.get("bytes"))
    if fmt == TRANSPLANT_FORMAT and isinstance(data.get("weights"), dict):
        w = data["weights"]
        # A folder's manifest.json speaks for the file it names; a `<stem>.json` for its own checkpoint.
        if isinstance(w.get("sha256"), str) and (not strict_name or w.get("file") == checkpoint_name):
            return Manifest(Path(source), data, w["sha256"], w.get("bytes"))
    return None


def find_manifest(checkpoint: str | Path) -> Manifest | None:
    """The manifest that describes `checkpoint`, or None when there is none (a nanoGPT ckpt.pt, a
    hand-made file). A manifest file that exists but cannot be read is an error, not a pass."""
    checkpoint = Path(checkpoint)
    for path in manifest_candidates(checkpoint):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{checkpoint}: its manifest {path} cannot be read ({type(e).__name__}: {e}); "
                "fetch it again or remove it"
            ) from None
        strict = path.name == TRANSPLANT_MANIFEST and path != manifest_path(checkpoint)
        found = parse_manifest(data, checkpoint.name, str(path), strict_name=strict)
        if found:
            return found
    return None


def mismatch_message(file: str, manifest: str, expected: str, actual: str, expected_size=None, actual_size=None) -> str:
    size = ""
    if expected_size is not None and actual_size is not None and expected_size != actual_size:
        size = f" (size: expected {expected_size:,} bytes, actual {actual_size:,})"
    return (
        f"{file}: sha256 differs from the one {manifest} recorded: expected {expected}, actual {actual}{size}. "
        "The file changed after it was written (corrupted, truncated or replaced): fetch it again "
        "(dvc pull / dvc get / dvc artifacts get) or rerun the stage that made it"
    )


def verify_checkpoint(
    checkpoint: str | Path, expected_sha256: str | None = None, require: bool = False
) -> Manifest | None:
    """Compare `checkpoint`'s sha256 with its manifest's (or with `expected_sha256`); raise ManifestMismatch
    naming the file, the expected and the actual hash. Returns the manifest (None when there is none and
    `require` is off; with `require` a missing manifest is an error)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    found = find_manifest(checkpoint)
    if expected_sha256 is None and found is None:
        if require:
            tried = " or ".join(str(p) for p in manifest_candidates(checkpoint))
            raise CheckpointError(f"{checkpoint}: no manifest ({tried}) to check it against")
        return None
    expected = expected_sha256 or found.sha256
    actual = sha256_file(checkpoint)
    if actual != expected:
        where = str(found.path) if found and not expected_sha256 else "the caller"
        raise ManifestMismatch(
            mismatch_message(
                str(checkpoint), where, expected, actual, found.size if found else None, checkpoint.stat().st_size
            )
        )
    if found and expected_sha256 and found.sha256 != actual:
        raise ManifestMismatch(mismatch_message(str(checkpoint), str(found.path), found.sha256, actual))
    return found


def write_manifest(checkpoint: str | Path, *, dvc_stage: str, mlflow_run_id: str, git_commit: str, **fields) -> dict:
    """Write `<stem>.json` beside `checkpoint` (atomically) and return it: the file's sha256 and size, its
    provenance (MLflow run, git commit, DVC stage, experiment name under `dvc exp run`) and `fields`."""
    checkpoint = Path(checkpoint)
    manifest = {
        "format": FORMAT,
        "file": checkpoint.name,
        "sha256": sha256_file(checkpoint),
        "bytes": checkpoint.stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dvc_stage": dvc_stage,
        "mlflow_run_id": mlflow_run_id,
        "git_commit": git_commit,
    }
    if os.environ.get("DVC_EXP_NAME"):
        manifest["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    manifest.update(fields)
    atomic_write_text(manifest_path(checkpoint), json.dumps(manifest, indent=2) + "\n")
    return manifest


def checkpoint_tags(checkpoint: str | Path, sha256: str | None = None, prefix: str = "checkpoint") -> dict:
    """MLflow tags of a run that used `checkpoint`: its sha256 and, when it has a manifest, the MLflow run
    and git commit that made it (`checkpoint.sha256`, `checkpoint.run_id`, `checkpoint.git_commit`)."""
    checkpoint = Path(checkpoint)
    tags = {f"{prefix}.sha256": sha256 or sha256_file(checkpoint)}
    found = find_manifest(checkpoint)
    if found and found.run_id:
        tags[f"{prefix}.run_id"] = found.run_id
    if found and found.git_commit:
        tags[f"{prefix}.git_commit"] = found.git_commit
    return tags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check checkpoints against their manifests (sha256).")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--sha256", help="check against this sha256 (e.g. an MLflow run's checkpoint.sha256 tag)")
    args = ap.parse_args(argv)
    status = 0
    for f in args.files:
        try:
            m = verify_checkpoint(f, args.sha256, require=args.sha256 is None)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        sha = args.sha256 or m.sha256
        extra = f"; manifest {m.path}, MLflow run {m.run_id}, git commit {m.git_commit}" if m else ""
        print(f"ok {f}: sha256 {sha}{extra}")
    return status


if __name__ == "__main__":
    sys.exit(main())
