"""Half-precision copies of the cuTile model's matrix weights, written when the weights change, not per forward.

Under autocast every forward casts each fp32 weight to bf16 (and every backward casts each weight gradient
back): a cast kernel per weight and step. The fused forward (gptcore/fused_forward.py) reads these copies
instead: non-persistent buffers `weight_half` (and c_attn's `bias_half`) on each Linear it runs, so they move
with `.to(device)`, stay out of the state dict and the checkpoint (which keep the fp32 weights: a resumed run
is exact), and torch.compile and CUDA graphs see them at fixed addresses. They are refreshed

- by the optimizer: CuTileGPT.configure_optimizers registers a step post-hook, one multi-tensor copy kernel
  (torch._foreach_copy_ from the fp32 weights), captured with the optimizer step in a graphed training step;
- before an eager forward, when a weight changed otherwise (load_state_dict, an in-place edit, `.to()`): each
  weight's storage and version counter are compared with those of the last refresh.

Under torch.compile that check cannot run; there the copies must exist (`prepare`, which make_train_step calls)
or the fused forward casts in the graph, as autocast would.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT, BIAS = "weight_half", "bias_half"


def half_linears(model: nn.Module) -> list[tuple[nn.Linear, bool]]:
    """The Linear layers whose weights the fused forward reads in half precision, each with whether its bias is
    read so too (c_attn's, in its matmul; the other biases are added in fp32 by the kernels after them)."""
    out = []
    for block in model.transformer.h:
        out += [(block.attn.c_attn, True), (block.attn.c_proj, False), (block.mlp.c_fc, False)]
        out.append((block.mlp.c_proj, False))
    out.append((model.lm_head, False))  # tied: the embedding's weight
    return out


def _pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The copies and their fp32 sources, in one order."""
    halves, masters = [], []
    for linear, with_bias in half_linears(model):
        halves.append(getattr(linear, WEIGHT))
        masters.append(linear.weight)
        if with_bias and linear.bias is not None:
            halves.append(getattr(linear, BIAS))
            masters.append(linear.bias)
    return halves, masters


def _stamp(masters: list[torch.Tensor], halves: list[torch.Tensor]) -> tuple:
    """What changes when a weight or a copy is replaced or written in place: storages and version counters."""
    return tuple((m.data_ptr(), m._version, h.data_ptr()) for m, h in zip(masters, halves))


def dtype_of(model: nn.Module) -> torch.dtype | None:
    """The copies' dtype, or None when there are none."""
    half = getattr(model.lm_head, WEIGHT, None)
    return None if half is None else half.dtype


def prepare(model: nn.Module, dtype: torch.dtype) -> None:
    """Make the copies in `dtype` (bf16 or fp16) if there are none in it, and bring them up to date."""
    if dtype_of(model) != dtype or any(
        getattr(linear, WEIGHT).shape != linear.weight.shape for linear, _ in half_linears(model)
    ):
        for linear, with_bias in half_linears(model):
            linear.register_buffer(WEIGHT, torch.empty_like(linear.weight, dtype=dtype), persistent=False)
            if with_bias and linear.bias is not None:
                linear.register_buffer(BIAS, torch.empty_like(linear.bias, dtype=dtype), persistent=False)
        for half in _pairs(model)[0]:
            torch._dynamo.mark_static_address(half)  # a compiled graph reads them in place, never copies them in
        model._half_stamp = None
    if stale(model):
        refresh(model)


def refresh(model: nn.Module) -> None:
    """Copy every weight into its half copy (one multi-tensor kernel); a no-op without copies."""
    if dtype_of(model) is None:
        return
    halves, masters = _pairs(model)
    with torch.no_grad():
        torch._foreach_copy_(halves, masters)
    model._half_stamp = _stamp(masters, halves)


def stale(model: nn.Module) -> bool:
    """Whether a weight changed (or moved) since the last refresh."""
    halves, masters = _pairs(model)
    return getattr(model, "_half_stamp", None) != _stamp(masters, halves)


def current(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the fused forward may read the copies in `dtype`: eagerly they are made or refreshed here first;
    under torch.compile they are used when they exist in that dtype (the optimizer keeps them current)."""
    if torch.compiler.is_compiling():
        return dtype_of(model) == dtype
    prepare(model, dtype)
    return True
