"""The cuTile GPT: the reference model with its LayerNorms and attention running on cuTile kernels.

Only the two module classes change; every parameter keeps the reference's name and shape, so a state
dict moves between `GPT` and `CuTileGPT` unchanged. The kernels are differentiable, so this model
trains: gradients flow through them into every block's weights.
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
                "still applies to embeddings, residual and MLP outputs)",
                stacklevel=2,
            )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.causal_attention(q, k, v)


class CuTileGPT(GPT):
    layer_norm_cls = CuTileLayerNorm
    attention_cls = CuTileSelfAttention


def model_class(backend: str) -> type[GPT]:
    """The model class of a backend: `GPT` for torch, `CuTileGPT` for cutile."""
    if backend == "torch":
        return GPT
    if backend == "cutile":
        return CuTileGPT
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def build_model(config: GPTConfig, backend: str = "torch") -> GPT:
    cls = model_class(backend)
    if backend == "cutile":
        kernels.require_cutile()
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        return cls(config)
