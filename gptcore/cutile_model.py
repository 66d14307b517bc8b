"""The cuTile GPT: the reference model with its LayerNorms, attention, GELU and loss on cuTile kernels.

Only the two module classes and the forward change; every parameter keeps the reference's name and shape, so a
state dict moves between `GPT` and `CuTileGPT` unchanged (the half copies of the weights are non-persistent).
The kernels are PyTorch custom operators with their backward registered, so this model trains (dropout
included, inside the kernels), compiles with torch.compile(fullgraph=True), exports, and captures in CUDA graphs.
"""

from __future__ import annotations

import torch

from gptcore import half_weights
from gptcore.decode_forward import decode_step
from gptcore.errors import ParamsError
from gptcore.fused_forward import HALF_DTYPES, fused_dtype, fused_forward
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
    """The cuTile model. A forward whose matmuls run in half precision (under autocast, or with half weights)
    takes the fused path (gptcore/fused_forward.py): a few fused kernels per sublayer, the weights read from half
    copies that the optimizer keeps current (gptcore/half_weights.py); in training with a large vocabulary it
    returns (None, loss), as the LM head and its loss are fused and the logits never made. With a KV cache, the
    prompt into an empty cache takes the fused path too (filling the cache), and one token per row takes the decode
    step (gptcore/decode_forward.py). fp32 runs, and a block of tokens continuing a cache, take the module path: the
    reference's modules with cuTile LayerNorm and attention."""

    layer_norm_cls = CuTileLayerNorm
    attention_cls = CuTileSelfAttention

    def forward(self, idx, targets=None, kv_cache=None):
        dtype = fused_dtype(self, idx.device.type)
        if dtype is None:
            return super().forward(idx, targets, kv_cache)
        if kv_cache is None:
            return fused_forward(self, idx, targets, dtype)
        if targets is None and kv_cache[0].length == 0:  # prefill: the prompt into an empty cache
            return fused_forward(self, idx, None, dtype, kv_cache)
        if targets is None and idx.size(1) == 1:  # a decode step
            return decode_step(self, idx, kv_cache, dtype), None
        return super().forward(idx, targets, kv_cache)

    def prepare_half_weights(self, dtype: torch.dtype) -> None:
        """Make the half copies of the weights for matmuls in `dtype` before the forward is compiled or captured
        (eagerly, the forward makes them itself); a no-op for other dtypes."""
        if dtype in HALF_DTYPES and self.lm_head.weight.dtype != dtype:
            half_weights.prepare(self, dtype)

    def configure_optimizers(self, *args, **kwargs) -> torch.optim.AdamW:
        """The reference's AdamW, and every step then refreshes the half copies of the weights (one kernel)."""
        optimizer = super().configure_optimizers(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: half_weights.refresh(self))
        return optimizer


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
