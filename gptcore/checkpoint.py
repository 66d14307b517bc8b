"""Checkpoint files: atomic writes, safe loads, and the sha256 that identifies a checkpoint.

A checkpoint is a dict saved with torch.save and loaded with `weights_only=True`, so loading one never
executes code from the file. Writes go to a temporary file in the same folder and are renamed into
place, so an interrupted write never leaves a half-written checkpoint where a good one was. A checkpoint with
a manifest beside it (gptcore/manifest.py) loads only when its sha256 is the one the manifest records.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path`; remove the temp file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path, map_location="cpu", verify: bool = True) -> dict:
    """Load a checkpoint without executing code from it; clear errors for a missing or broken file.

    With `verify` (the default), a checkpoint that has a manifest beside it (out/ckpt.json for out/ckpt.pt,
    see gptcore/manifest.py) is first checked against it: a sha256 mismatch is refused with a message that
    names the file, the expected and the actual hash (ManifestMismatch, a CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if verify:
        from gptcore.manifest import verify_checkpoint  # imported here: manifest imports this module
        verify_checkpoint(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated, corrupted or unsafe files
        raise CheckpointError(f"{path}: cannot be loaded as a safe (weights-only) torch checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj
