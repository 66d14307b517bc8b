"""cuTile kernels of gptcore: LayerNorm and causal flash attention, forward and backward.

Importing this package works on any machine; cuda.tile is imported only when a kernel is called.
Without a CUDA GPU (or without cuda.tile) every call raises BackendUnavailable with the reason: there
is no silent fallback to PyTorch.
"""

from __future__ import annotations

from gptcore.kernels.runtime import cutile_unavailable, require_cutile

__all__ = ["causal_attention", "cutile_unavailable", "layer_norm", "require_cutile"]


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dimension (as F.layer_norm with normalized_shape=(N,)), on cuTile."""
    require_cutile()
    from gptcore.kernels.layernorm import layer_norm as impl

    return impl(x, weight, bias, eps)


def causal_attention(q, k, v, scale: float | None = None, dropout_p: float = 0.0, rng=None):
    """Causal flash attention, q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk, on cuTile; with dropout on the
    probabilities (keys `rng`, gptcore.kernels.dropout)."""
    require_cutile()
    from gptcore.kernels.attention import causal_attention as impl

    return impl(q, k, v, scale, dropout_p, rng)
