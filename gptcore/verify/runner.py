"""Run the compile gate and the five levels on one set of checked weights."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gptcore import data as gdata
from gptcore.devices import DTYPES, resolve_device
from gptcore.errors import UserError
from gptcore.model import GPT
from gptcore.transplant import CheckedWeights
from gptcore.verify import gate, l1_kernels, l2_blocks, l3_logits, l4_decode, l5_grads
from gptcore.verify.common import FAIL, PASS, SKIPPED, Candidate, Result, cutile_candidate

TITLES = {
    "compile": gate.TITLE,
    "L1": l1_kernels.TITLE,
    "L2": l2_blocks.TITLE,
    "L3": l3_logits.TITLE,
    "L4": l4_decode.TITLE,
    "L5": l5_grads.TITLE,
}


class VerifyError(UserError, ValueError):
    """Verification cannot start (no GPU asked for but absent, data too short, ...): the message says why."""


@dataclass
class Verification:
    weights: CheckedWeights
    candidate: str
    device: str
    model_dtype: str
    decode_dtype: str
    results: list[Result] = field(default_factory=list)  # the compile gate, then L1 ... L5
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def status(self) -> str:
        """fail if anything failed; pass only if everything ran and passed; incomplete when something was
        skipped and nothing failed (a skipped level never counts as a pass)."""
        if self.count(FAIL):
            return FAIL
        return PASS if self.count(PASS) == len(self.results) else "incomplete"


def val_batches(val: np.ndarray, block_size: int, batches: int, batch_size: int, device) -> list:
    """`batches` (x, y) pairs of block_size tokens, the rows evenly spaced over the split (no randomness:
    every run, on every machine, sees the same text)."""
    if len(val) < block_size + 2:
        raise VerifyError(
            f"the validation split has {len(val)} tokens; verification needs at least block_size + 2 = {block_size + 2}"
        )
    offsets = np.linspace(0, len(val) - block_size - 1, batches * batch_size).astype(np.int64)
    return [gdata.batch_at(val, row, block_size, device) for row in offsets.reshape(batches, batch_size)]


def prompts_from(val: np.ndarray, count: int, length: int, device) -> torch.Tensor:
    """`count` prompts of `length` tokens cut from evenly spaced places in the split."""
    offsets = np.linspace(0, len(val) - length, count).astype(np.int64)
    rows = np.stack([np.asarray(val[o : o + length], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows).to(device)


def build(cls: type[GPT], weights: CheckedWeights, device: torch.device) -> GPT:
    # Dropout 0: eval mode switches it off anyway; L1 checks the kernels' dropout on its own.
    model = cls(dataclasses.replace(weights.config, dropout=0.0))
    model.load_state_dict(weights.state_dict, strict=True)
    return model.to(device).eval()


def guarded(name: str, fn: Callable[[], Result]) -> Result:
    """Run one level; an exception (a kernel that raises, a CUDA error) fails the level with its message
    instead of ending the run, so the report is still written. The traceback goes to stderr."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result = Result(name, TITLES[name])
        result.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def verify(
    weights: CheckedWeights,
    val: np.ndarray,
    vp,
    candidate: Candidate | None = None,
    device: torch.device | str | None = None,
    decode: Callable | None = None,
) -> Verification:
    """Compare the reference model with the candidate model (default: CuTileGPT on the cuTile kernels)
    on `weights`: the compile gate, then L1-L5 as `vp` (the `verify` params) sets them.
    `val` is the validation split's token ids; `decode` turns ids into text for the report."""
    t0 = time.perf_counter()
    device = resolve_device(str(device) if device is not None else vp.device, "verify.device")
    candidate = candidate or cutile_candidate(device)
    config, dtype = weights.config, DTYPES[vp.model_dtype]
    v = Verification(weights, candidate.name, _describe(device), vp.model_dtype, vp.decode_dtype)

    v.results.append(
        guarded(
            "compile",
            lambda: gate.run(
                config,
                list(vp.compile_archs),
                vp.compile_scope,
                vp.model_dtype,
                vp.decode_dtype,
                dropout=config.dropout > 0 or any(p > 0 for p in vp.dropouts),
            ),
        )
    )
    if candidate.unavailable:  # skipped with the reason, never a silent fallback to PyTorch
        for name in ("L1", "L2", "L3", "L4", "L5"):
            v.results.append(Result(name, TITLES[name], SKIPPED, reason=candidate.unavailable))
        v.seconds = round(time.perf_counter() - t0, 2)
        return v

    torch.manual_seed(vp.seed)
    batches = val_batches(val, config.block_size, vp.batches, vp.batch_size, device)
    prompts = prompts_from(val, vp.num_prompts, min(vp.prompt_len, config.block_size), device)
    ref = build(GPT, weights, device)
    cand = build(candidate.model_class(), weights, device)
    tol = getattr(vp.tolerances, vp.model_dtype)
    x, y = batches[0]
    v.results += [
        guarded("L1", lambda: l1_kernels.run(candidate, config, weights.state_dict, vp, device)),
        guarded("L2", lambda: l2_blocks.run(ref, cand, x, dtype, tol)),
        guarded("L3", lambda: l3_logits.run(ref, cand, batches, dtype, tol)),
        guarded(
            "L4",
            lambda: l4_decode.run(
                ref, cand, prompts, vp.decode_tokens, DTYPES[vp.decode_dtype], decode, vp.decode_tie_gap
            ),
        ),
        guarded("L5", lambda: l5_grads.run(ref, cand, x, y, dtype, tol)),
    ]
    v.seconds = round(time.perf_counter() - t0, 2)
    return v


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return str(device)
