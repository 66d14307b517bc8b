"""Checkpoint files: safe loads, atomic saves, and models built from them (ours and karpathy/nanoGPT's).

A checkpoint is a dict saved with torch.save and loaded with `weights_only=True`, so loading one never
executes code from the file. Saves are atomic (gptcore.files), so an interrupted write never leaves a
half-written checkpoint where a good one was. A checkpoint with a manifest beside it
(gptcore/manifest.py) loads only when its sha256 is the one the manifest records.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from gptcore.errors import CheckpointError
from gptcore.files import atomic_write
from gptcore.manifest import verify_checkpoint
from gptcore.model import GPT, GPTConfig

__all__ = [
    "CheckpointError",
    "check_finite",
    "clean_state_dict",
    "gpt_from_checkpoint",
    "load_checkpoint",
    "non_finite",
    "save_checkpoint",
]


class _ByteCounter(io.RawIOBase):
    """A file that keeps nothing and counts what is written to it."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.count += len(b)
        return len(b)


def serialized_size(obj: dict) -> int:
    """The bytes torch.save writes for `obj`, found by writing it to nowhere (asked when a disk is full)."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


def _torch_save(obj: dict, tmp: str) -> None:
    # Through a Python file, so a full disk is an OSError with its errno (written to a path, torch says only
    # "unexpected pos"), and the archive's inner folder is "archive", not the random temp file's name.
    with open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's writer, closed after a write failed, raises "unexpected pos" over the write's OSError
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from e


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: _torch_save(obj, tmp), size=lambda: serialized_size(obj))


def load_checkpoint(path: str | Path, map_location="cpu", verify: bool = True) -> dict:
    """Load a checkpoint without executing code from it; clear errors for a missing or broken file.

    With `verify` (the default), a checkpoint that has a manifest beside it (out/ckpt.json for out/ckpt.pt,
    see gptcore/manifest.py) is first checked against it: a sha256 mismatch is refused with a message that
    names the file, the expected and the actual hash (ManifestMismatch, a CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if verify:
        verify_checkpoint(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated, corrupted or unsafe files
        raise CheckpointError(
            f"{path}: not a checkpoint this project can read ({type(e).__name__} from torch.load with "
            "weights_only=True): truncated, corrupted, or not a dict of tensors and plain values; fetch it again "
            "or rerun the stage that made it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the prefixes that torch.compile (`_orig_mod.`) and DDP (`module.`) add to parameter names,
    and nanoGPT's non-parameter causal-mask buffers (`attn.bias` of its slow attention path)."""
    out = {}
    for name, tensor in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix) :]
        if name.endswith(".attn.bias") and tensor.dim() == 4:
            continue
        out[name] = tensor
    return out


def non_finite(state_dict: dict) -> list[str]:
    """The floating-point tensors of a state dict that hold NaN or inf, each with how many."""
    bad, seen = [], set()
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            if (t.data_ptr(), t.shape) in seen:
                continue  # the tied embedding under its second name: one tensor, named once
            seen.add((t.data_ptr(), t.shape))
            bad.append(f"{name} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf)")
    return bad


def check_finite(state_dict: dict, source: str | Path) -> None:
    """Refuse weights with NaN or inf, naming the tensors: such a model samples noise and compares unequal to
    itself (NaN != NaN), which other checks would misreport."""
    bad = non_finite(state_dict)
    if bad:
        raise CheckpointError(
            f"{source}: non-finite values in {len(bad)} tensors: "
            + "; ".join(bad[:8])
            + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        )


def gpt_from_checkpoint(checkpoint: dict, cls: type[GPT] = GPT) -> GPT:
    """A model built from a checkpoint dict with `model_args` and `model` (ours or nanoGPT's train.py),
    strictly: every parameter present, none left over."""
    model = cls(GPTConfig.from_dict(dict(checkpoint["model_args"])))
    model.load_state_dict(clean_state_dict(checkpoint["model"]), strict=True)
    return model
