"""The cuTile GPT: the reference model with its LayerNorms and attention running on cuTile kernels.

Only the two module classes change; every parameter keeps the reference's name and shape, so a state
dict moves between `GPT` and `CuTileGPT` unchanged. The kernels sit behind torch.autograd.Functions
(gptcore/kernels), so this model trains: gradients flow through them into every block's weights.
"""

from __future__ import annotations

import warnings

import torch

from gptcore import kernels
from gptcore.model import GPT, CausalSelfAttention, GPTConfig, LayerNorm

BACKENDS = ("torch", "cutile")


class CuTileLayerNorm(LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class CuTileSelfAttention(CausalSelfAttention):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        if config.dropout > 0:
            # The flash kernel never materialises the attention matrix, so it applies no dropout to it;
            # embedding, residual and MLP dropout are unchanged. Said once, not silently.
            warnings.warn(
                f"cuTile attention applies no dropout to attention probabilities (dropout={config.dropout} "
                "still applies to embeddings, residual and MLP outputs)", stacklevel=2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.causal_attention(q, k, v)


class CuTileGPT(GPT):
    layer_norm_cls = CuTileLayerNorm
    attention_cls = CuTileSelfAttention


def require_cutile(device: torch.device | str | None = None) -> None:
    """Raise a clear error when the cuTile kernels cannot run here (never fall back to PyTorch)."""
    reason = kernels.cutile_available()
    if reason is None and device is not None and torch.device(device).type != "cuda":
        reason = f"the cuTile backend runs on a CUDA device, not on {device}"
    if reason is not None:
        raise RuntimeError(f"backend 'cutile' cannot run: {reason}. Use backend 'torch' on this machine.")


def build_model(config: GPTConfig, backend: str = "torch") -> GPT:
    if backend == "torch":
        return GPT(config)
    if backend == "cutile":
        require_cutile()
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            return CuTileGPT(config)
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
