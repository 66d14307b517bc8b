"""Hierarchical verification: the cuTile model against the reference, level by level.

    compile gate  the cuTile kernels compile ahead of time (no GPU needed)
    L1 kernels    each kernel vs the PyTorch functional reference, forward and gradients   (l1_kernels.py)
    L2 blocks     each transformer block on the trained weights, and the drift through the stack (l2_blocks.py)
    L3 logits     full forward on validation text: abs diffs, KL, top-1 agreement       (l3_logits.py)
    L4 decode     greedy generation from the same prompts: identical token streams      (l4_decode.py)
    L5 gradients  one backward pass: per-parameter relative error                       (l5_grads.py)

Without a CUDA GPU the levels are skipped with the reason (never passed); the compile gate still runs.
The ops under test are injectable (`Candidate`), so the whole thing runs on the CPU against test doubles.
"""

from gptcore.verify.common import FAIL, PASS, SKIPPED, Candidate, Result, cutile_candidate, torch_candidate
from gptcore.verify.report import headline_metrics, level_metrics, metrics, render
from gptcore.verify.runner import Verification, VerifyError, verify

__all__ = [
    "FAIL",
    "PASS",
    "SKIPPED",
    "Candidate",
    "Result",
    "Verification",
    "VerifyError",
    "cutile_candidate",
    "headline_metrics",
    "level_metrics",
    "metrics",
    "render",
    "torch_candidate",
    "verify",
]
