"""What many tests share: the one tiny-model factory and the one error measure of kernel outputs (the
reference attention is the model's own, gptcore.model.causal_attention_reference)."""

from __future__ import annotations

import math

import torch

from gptcore.cutile_model import model_class
from gptcore.model import GPT, GPTConfig

TINY = dict(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)


def tiny_gpt(backend: str = "torch", seed: int = 0, **config) -> GPT:
    """A small GPT of the backend's class, its weights drawn after torch.manual_seed(seed); `config` overrides
    any GPTConfig field of TINY."""
    torch.manual_seed(seed)
    return model_class(backend)(GPTConfig(**{**TINY, **config}))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref|| / max(||ref||, floor), in float64; floor = 1e-3 * sqrt(numel), so an
    exactly-zero reference (a gradient at T = 1) is compared in absolute terms."""
    out, ref = out.double(), ref.double()
    floor = 1e-3 * math.sqrt(ref.numel())
    return ((out - ref).norm() / max(ref.norm().item(), floor)).item()
