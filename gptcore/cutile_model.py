"""The cuTile GPT: the reference model with its LayerNorms and attention running on cuTile kernels.

Only the two module classes change; every parameter keeps the reference's name and shape, so a state
dict moves between `GPT` and `CuTileGPT` unchanged. The kernels are PyTorch custom operators with their
backward registered, so this model trains (attention dropout included, inside the flash kernels),
compiles with torch.compile(fullgraph=True), exports, and captures in CUDA graphs.
"""

from __future__ import annotations

import torch

from gptcore.errors import ParamsError
from gptcore.kernels import require_cutile
from gptcore.kernels.runtime import attention_head_dim_unsupported
from gptcore.model import GPT, CausalSelfAttention, GPTConfig, LayerNorm

BACKENDS = ("torch", "cutile")


class CuTileLayerNorm(LayerNorm):
    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__(ndim, bias, eps)
        from gptcore.kernels.layernorm import layer_norm  # imports cuda.tile: only where the kernels run

        self.layer_norm = layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x, self.weight, self.bias, self.eps)


class CuTileSelfAttention(CausalSelfAttention):
    def __init__(self, config: GPTConfig):
        reason = attention_head_dim_unsupported(config.n_embd // config.n_head)
        if reason:  # refused when the model is built, not at its first forward
            raise ParamsError(
                f"the cuTile model cannot use n_embd {config.n_embd} with n_head {config.n_head} "
                f"(head dim {config.n_embd // config.n_head}): {reason}"
            )
        super().__init__(config)
        from gptcore.kernels.attention import causal_attention

        self.causal_attention = causal_attention

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)


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
    if backend == "cutile":
        require_cutile()
    return model_class(backend)(config)
