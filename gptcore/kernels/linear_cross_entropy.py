"""The tied LM head and its cross-entropy in training, for large vocabularies: the mean loss and the gradients of
the hidden states and of the head's weight, without ever holding the (B*T, V) logits whole.

The rows of hidden states go through in chunks (`chunk_rows`: a chunk's logits take at most LOGITS_CHUNK_BYTES,
in one buffer reused by every chunk). Per chunk c:

    logits   = h_c @ W^T                        cuBLAS, in h's half dtype
    loss_c, logits <- softmax - onehot(target)  one cuTile kernel: online log-sum-exp, then the gradient in place
    dh_c     = dlogits @ W                      cuBLAS, fp32 out
    dW      += dlogits^T @ h_c                  cuBLAS, accumulating in fp32

So the forward computes the gradients (the logits are gone by the backward) and the backward only scales them by
the loss's incoming gradient over the count of counted targets. They stay unscaled (softmax - onehot, within
[-1, 1]) until then, so fp16, whose GradScaler factor the forward cannot know, does not underflow them. Without
gradients the model keeps its logits path (gptcore/fused_forward.py): the logits are what it returns there.
Targets must be in [0, V) or equal to ignore_index (a kernel cannot raise); ignored rows get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.cross_entropy import _chunk, _row_lse, _targets, chunk_width
from gptcore.kernels.layernorm import as_rows
from gptcore.kernels.runtime import arch_of, launches_directly
from gptcore.kernels.spec import ConstInt, LaunchSpec, cdiv, launch

# A chunk's logits: GPT-2 small's training batch (B12 x T1024 x 50304 rows, 1.2 GB in bf16) in five chunks. Fewer,
# larger chunks read and write the fp32 weight gradient fewer times (it is accumulated once per chunk); more, smaller
# ones lower the peak.
LOGITS_CHUNK_BYTES = 256 * 2**20
# The model takes this path from this vocabulary on. At GPT-2 small's step it costs the same time as the plain head
# (logits, then the cross-entropy kernels) and holds ~1.9 GB less (results/h100/gpt2-small-step.csv, lm-head.csv);
# a character vocabulary's logits are smaller than the hidden states, with nothing to save.
FUSED_MIN_VOCAB = 4096
LCE_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LCETiles:
    rows: int  # rows of logits per block of the loss-and-gradient kernel
    max_chunk: int  # the widest vocabulary chunk it loads (a power of two)
    occ: int | None = None  # the kernel's occupancy hint (None: cuTile's default)


# sm_90: from the sweep at GPT-2 small's chunk (results/h100/tune-lm-head.json): few rows a block, wide chunks, and
# many blocks per SM to keep enough loads in flight. Two rows, the GPU tests' and the parity runs' tile, with the
# occupancy of the sweep's winner (one row, 2% faster, not yet run by the tests).
LCE_TILES = {"sm_90": LCETiles(rows=2, max_chunk=4096, occ=4), "default": LCETiles(rows=32, max_chunk=256)}


def tiles_for(arch: str, vocab: int | None = None) -> LCETiles:
    """The architecture's tiles (one entry serves every vocabulary: the kernel loops over it)."""
    return LCE_TILES.get(arch, LCE_TILES["default"])


def chunk_rows(rows: int, vocab: int, itemsize: int) -> int:
    """Rows of hidden states per chunk: as many as keep a chunk's logits within LOGITS_CHUNK_BYTES (at least one),
    a multiple of 128 from 128 on, so the matmuls see whole tiles and the chunks' row offsets stay aligned."""
    budget = LOGITS_CHUNK_BYTES // (vocab * itemsize)
    budget = budget // 128 * 128 if budget >= 128 else budget
    return max(1, min(rows, budget))


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------
def ce_grad_kernel_body(LOGITS, TARGETS, LOSS, ignore_index, TILE_ROWS: ConstInt, TILE_V: ConstInt):
    """Grid (cdiv(M, TILE_ROWS),). LOGITS (M, V) half, overwritten with softmax - onehot(target) (0 on ignored
    rows); TARGETS (M,) int64; LOSS (M,) fp32: lse - logit[target], 0 on ignored rows. Each block reads and
    writes its own rows only, so the in-place write is safe: a pass for the log-sum-exp, then one for the
    gradient."""
    r = ct.bid(0)
    t, valid = _targets(TARGETS, r, ignore_index, TILE_ROWS)
    lse, hit = _row_lse(LOGITS, r, t, TILE_ROWS, TILE_V)  # [TILE_ROWS, 1] each
    ct.store(LOSS, (r,), ct.where(valid, lse - hit, 0.0).reshape((TILE_ROWS,)))
    for j in range(ct.cdiv(LOGITS.shape[1], TILE_V)):
        logits, cols = _chunk(LOGITS, r, j, TILE_ROWS, TILE_V)  # [TILE_ROWS, TILE_V] fp32
        d = ct.exp(logits - lse) - ct.where(cols == t, 1.0, 0.0)
        ct.store(LOGITS, (r, j), ct.where(valid, d, 0.0).astype(LOGITS.dtype))


@cache
def grad_kernel(occupancy: int | None = None):
    if occupancy is None:
        return ct.kernel(ce_grad_kernel_body)
    return ct.kernel(ce_grad_kernel_body, occupancy=occupancy)


def grad_spec(logits, targets, loss, *, ignore_index: int, tiles: LCETiles) -> LaunchSpec:
    args = dict(LOGITS=logits, TARGETS=targets, LOSS=loss, ignore_index=ignore_index)
    args.update(TILE_ROWS=tiles.rows, TILE_V=chunk_width(logits.shape[1], tiles))
    return LaunchSpec(ce_grad_kernel_body, grad_kernel(tiles.occ), (cdiv(logits.shape[0], tiles.rows), 1, 1), args)


@cache
def _table_tiles(device_index: int) -> LCETiles:
    return tiles_for(arch_of(device_index))


def loss_and_grad_rows(logits2, targets1, loss, ignore_index: int, tiles: LCETiles | None = None) -> None:
    """The kernel on one chunk: the rows' losses into `loss` (M,) fp32, the logits overwritten by their gradient."""
    dev = logits2.get_device()
    launch(grad_spec(logits2, targets1, loss, ignore_index=ignore_index, tiles=tiles or _table_tiles(dev)), dev)


# --------------------------------------------------------------------------------------------------
# The chunked head, forward and backward
# --------------------------------------------------------------------------------------------------
def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (fp32) = a @ b, or += with `accumulate`: cuBLAS takes the half operands and writes fp32 itself. Off
    CUDA (the CPU kernels of the tests) the same product in fp32 math."""
    if a.is_cuda:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        product = a.float() @ b.float()
        out.add_(product) if accumulate else out.copy_(product)


def _forward(h2, weight_half, targets1, ignore_index: int, rows: int, with_grad: bool = True, grad_rows=None):
    """(mean loss over the counted targets (NaN when none counts, as F.cross_entropy), their count (fp32), dh (M, C)
    fp32 and dW (V, C) fp32 as the gradients of the summed, unscaled loss (empty without `with_grad`)).
    `rows`: rows per chunk; `grad_rows`: the loss-and-gradient kernel (a CPU stand-in in the tests)."""
    grad_rows = grad_rows or loss_and_grad_rows
    m, c = h2.shape
    vocab = weight_half.shape[0]
    buffer = h2.new_empty(min(rows, m), vocab)
    row_loss = h2.new_empty(m, dtype=torch.float32)
    dh = h2.new_empty((m, c) if with_grad else (0,), dtype=torch.float32)
    dw = h2.new_empty((vocab, c) if with_grad else (0,), dtype=torch.float32)
    for start in range(0, m, rows):
        n = min(rows, m - start)
        h_c, logits = h2[start : start + n], buffer[:n]
        torch.mm(h_c, weight_half.t(), out=logits)
        grad_rows(logits, targets1[start : start + n], row_loss[start : start + n], ignore_index)
        if with_grad:
            _mm_f32(logits, weight_half, dh[start : start + n])
            _mm_f32(logits.t(), h_c, dw, accumulate=start > 0)
    count = (targets1 != ignore_index).sum().to(torch.float32)
    return row_loss.sum() / count, count, dh, dw


def _backward(dh, dw, count, grad, h_dtype: torch.dtype, weight_dtype: torch.dtype):
    """The gradients of h and of the weight for the loss's incoming gradient `grad`."""
    scale = grad.float() / count
    return (dh * scale).to(h_dtype), (dw * scale).to(weight_dtype)


# --------------------------------------------------------------------------------------------------
# The custom operator and the eager path
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("gptcore::linear_cross_entropy_fwd", mutates_args=(), device_types="cuda")
def linear_cross_entropy_fwd_op(
    h: torch.Tensor, weight: torch.Tensor, weight_half: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The mean loss (0-dim fp32), the count of counted targets, and dh (M, C), dW (V, C) fp32 unscaled. `weight` is
    the parameter the gradient goes to; the matmuls read `weight_half`, its copy in h's dtype (or itself)."""
    return _forward(as_rows(h, h.shape[-1]), weight_half, targets.contiguous(), ignore_index, rows)


@linear_cross_entropy_fwd_op.register_fake
def _(h, weight, weight_half, targets, ignore_index, rows):
    scalar = h.new_empty((), dtype=torch.float32)
    dh = h.new_empty(h.shape, dtype=torch.float32)
    return scalar, torch.empty_like(scalar), dh, weight_half.new_empty(weight_half.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    h, weight, *_ = inputs
    _, count, dh, dw = output
    ctx.mark_non_differentiable(count, dh, dw)
    ctx.save_for_backward(dh, dw, count)
    ctx.dtypes = (h.dtype, weight.dtype)


def _op_backward(ctx, grad, _dcount, _ddh, _ddw):
    dh, dw, count = ctx.saved_tensors
    return (*_backward(dh, dw, count, grad, *ctx.dtypes), None, None, None, None)


linear_cross_entropy_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerLinearCrossEntropy(torch.autograd.Function):
    """The eager path: the launch helpers without the custom operator's dispatch."""

    @staticmethod
    def forward(ctx, h2, weight, weight_half, targets1, ignore_index, rows):
        loss, count, dh, dw = _forward(h2, weight_half, targets1, ignore_index, rows)
        ctx.save_for_backward(dh, dw, count)
        ctx.dtypes = (h2.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, count = ctx.saved_tensors
        return (*_backward(dh, dw, count, grad, *ctx.dtypes), None, None, None, None)


def _check(h, weight, weight_half, targets):
    c = h.shape[-1]
    if h.dtype not in LCE_DTYPES:
        raise TypeError(f"linear_cross_entropy: hidden states dtype {h.dtype} not in {LCE_DTYPES}")
    if weight.dim() != 2 or weight.shape[1] != c or weight_half.shape != weight.shape or weight_half.dtype != h.dtype:
        raise ValueError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} (copy {tuple(weight_half.shape)} {weight_half.dtype}) "
            f"does not match hidden states {tuple(h.shape)} {h.dtype}: expected (V, {c}), the copy in {h.dtype}"
        )
    if targets.numel() * c != h.numel() or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} {targets.dtype} do not match hidden states "
            f"{tuple(h.shape)} (one integer target per row)"
        )
    if not (h.is_cuda and weight_half.is_cuda and targets.is_cuda):
        raise RuntimeError("cuTile linear_cross_entropy needs CUDA tensors")
    if targets.numel() == 0:
        raise ValueError("linear_cross_entropy got no rows")


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weight_half: torch.Tensor | None = None,
    ignore_index: int = -1,
    rows: int | None = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(h, weight).float() over rows, targets, ignore_index) with the matmuls in h's half
    dtype (from `weight_half`, weight's copy in that dtype, when given; else a cast of it): a 0-dim fp32 loss,
    differentiable in h and weight. `rows`: rows of h per chunk (default: `chunk_rows`)."""
    if weight_half is None:
        weight_half = weight if weight.dtype == h.dtype else weight.detach().to(h.dtype)
    _check(h, weight, weight_half, targets)
    h2, targets1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    rows = rows or chunk_rows(h2.shape[0], weight.shape[0], h2.element_size())
    ignore_index = int(ignore_index)
    if not launches_directly(h2, weight_half, targets1):
        return linear_cross_entropy_fwd_op(h2, weight, weight_half, targets1, ignore_index, rows)[0]
    h2, targets1 = as_rows(h2, h2.shape[1]), targets1.contiguous()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _EagerLinearCrossEntropy.apply(h2, weight, weight_half, targets1, ignore_index, rows)
    return _forward(h2, weight_half, targets1, ignore_index, rows, with_grad=False)[0]
