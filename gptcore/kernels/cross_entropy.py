"""Cross-entropy of the LM head's logits in cuTile, forward and backward: F.cross_entropy with ignore_index and
the mean over the targets that count.

The forward kernel reads each row of logits once, in chunks of the vocabulary with an online max and sum
(the softmax is never written), and writes the row's loss and its log-sum-exp; the mean is a sum over rows
divided by the count of counted targets. The backward kernel rebuilds the softmax from the logits and the saved
log-sum-exp and writes dlogits = (softmax - onehot(target)) * grad / count in the logits' dtype, 0 on ignored
rows: no fp32 copy of the logits, no separate log-softmax, no stored probabilities. Targets must be in [0, V) or
equal to ignore_index (as F.cross_entropy asks; a kernel cannot raise).

The logits are materialised here (B*T x V): right for the character vocabulary. Large vocabularies in training
take kernels/linear_cross_entropy.py, which never holds them whole and reuses this file's row helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.layernorm import as_rows, load_f32, next_pow2
from gptcore.kernels.runtime import arch_of, launches_directly
from gptcore.kernels.spec import ConstInt, LaunchSpec, cdiv, launch

ZERO = ct.PaddingMode.ZERO
FLOOR = -1.0e30  # padded vocabulary columns: exp(FLOOR - max) is exactly 0 in fp32
CE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class CETiles:
    rows: int  # rows of logits per block
    max_chunk: int  # the widest vocabulary chunk (a power of two); narrower vocabularies take one padded chunk


CE_TILES = {"sm_90": CETiles(rows=32, max_chunk=256), "default": CETiles(rows=32, max_chunk=256)}


def tiles_for(arch: str) -> CETiles:
    return CE_TILES.get(arch, CE_TILES["default"])


def chunk_width(vocab: int, tiles: CETiles) -> int:
    return min(next_pow2(vocab), tiles.max_chunk)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _targets(TARGETS, r, ignore_index, TILE_ROWS):
    """The row tile's targets as int32 [TILE_ROWS, 1] and whether each counts (padded rows do not)."""
    t = ct.load(TARGETS, (r,), (TILE_ROWS,), padding_mode=ZERO).astype(ct.int32)
    rows = r * TILE_ROWS + ct.arange(TILE_ROWS, dtype=ct.int32)
    valid = (t != ignore_index) & (rows < TARGETS.shape[0])
    return t.reshape((TILE_ROWS, 1)), valid.reshape((TILE_ROWS, 1))


def _chunk(LOGITS, r, j, TILE_ROWS, TILE_V):
    """Vocabulary chunk j of the row tile, fp32 [TILE_ROWS, TILE_V], padded columns at FLOOR; and its columns."""
    cols = j * TILE_V + ct.arange(TILE_V, dtype=ct.int32)[None, :]  # [1, TILE_V]
    logits = load_f32(LOGITS, (r, j), (TILE_ROWS, TILE_V), 0)
    return ct.where(cols < LOGITS.shape[1], logits, FLOOR), cols


def _row_lse(LOGITS, r, t, TILE_ROWS, TILE_V):
    """The row tile's log-sum-exp and its targets' logits, fp32 [TILE_ROWS, 1] each, in one pass over the
    vocabulary (an online max and sum: the softmax is never held)."""
    m = ct.full((TILE_ROWS, 1), FLOOR, dtype=ct.float32)  # running max
    s = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)  # running sum of exp(l - m)
    hit = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)  # the target's logit
    for j in range(ct.cdiv(LOGITS.shape[1], TILE_V)):
        logits, cols = _chunk(LOGITS, r, j, TILE_ROWS, TILE_V)
        m_new = ct.maximum(m, ct.max(logits, axis=1, keepdims=True))
        s = s * ct.exp(m - m_new) + ct.sum(ct.exp(logits - m_new), axis=1, keepdims=True)
        m = m_new
        hit = hit + ct.sum(ct.where(cols == t, logits, 0.0), axis=1, keepdims=True)
    return m + ct.log(s), hit


def ce_fwd_kernel_body(LOGITS, TARGETS, LOSS, LSE, ignore_index, TILE_ROWS: ConstInt, TILE_V: ConstInt):
    """Grid (cdiv(M, TILE_ROWS),). LOGITS (M, V); TARGETS (M,) int64; LOSS, LSE (M,) fp32: lse - logit[target]
    (0 on ignored rows) and the row's log-sum-exp."""
    r = ct.bid(0)
    t, valid = _targets(TARGETS, r, ignore_index, TILE_ROWS)
    lse, hit = _row_lse(LOGITS, r, t, TILE_ROWS, TILE_V)
    ct.store(LOSS, (r,), ct.where(valid, lse - hit, 0.0).reshape((TILE_ROWS,)))
    ct.store(LSE, (r,), lse.reshape((TILE_ROWS,)))


def ce_bwd_kernel_body(LOGITS, TARGETS, LSE, SCALE, DLOGITS, ignore_index, TILE_ROWS: ConstInt, TILE_V: ConstInt):
    """Grid (cdiv(M, TILE_ROWS),). DLOGITS (M, V) = (exp(l - lse) - onehot(target)) * SCALE[0] on counted rows,
    0 on ignored ones. SCALE (1,) fp32 on the device: the loss's gradient over the count of counted targets."""
    r = ct.bid(0)
    t, valid = _targets(TARGETS, r, ignore_index, TILE_ROWS)
    lse = ct.load(LSE, (r,), (TILE_ROWS,), padding_mode=ZERO).reshape((TILE_ROWS, 1))
    scale = ct.load(SCALE, (0,), (1,)).reshape((1, 1))
    for j in range(ct.cdiv(LOGITS.shape[1], TILE_V)):
        logits, cols = _chunk(LOGITS, r, j, TILE_ROWS, TILE_V)
        d = ct.exp(logits - lse) - ct.where(cols == t, 1.0, 0.0)
        ct.store(DLOGITS, (r, j), ct.where(valid, d * scale, 0.0).astype(DLOGITS.dtype))


@cache
def fwd_kernel():
    return ct.kernel(ce_fwd_kernel_body)


@cache
def bwd_kernel():
    return ct.kernel(ce_bwd_kernel_body)


# --------------------------------------------------------------------------------------------------
# Launch specs and helpers on (M, V) logits
# --------------------------------------------------------------------------------------------------
def fwd_spec(logits, targets, loss, lse, *, ignore_index: int, tiles: CETiles) -> LaunchSpec:
    args = dict(LOGITS=logits, TARGETS=targets, LOSS=loss, LSE=lse, ignore_index=ignore_index)
    args.update(TILE_ROWS=tiles.rows, TILE_V=chunk_width(logits.shape[1], tiles))
    return LaunchSpec(ce_fwd_kernel_body, fwd_kernel(), (cdiv(logits.shape[0], tiles.rows), 1, 1), args)


def bwd_spec(logits, targets, lse, scale, dlogits, *, ignore_index: int, tiles: CETiles) -> LaunchSpec:
    args = dict(LOGITS=logits, TARGETS=targets, LSE=lse, SCALE=scale, DLOGITS=dlogits, ignore_index=ignore_index)
    args.update(TILE_ROWS=tiles.rows, TILE_V=chunk_width(logits.shape[1], tiles))
    return LaunchSpec(ce_bwd_kernel_body, bwd_kernel(), (cdiv(logits.shape[0], tiles.rows), 1, 1), args)


@cache
def _table_tiles(device_index: int) -> CETiles:
    return tiles_for(arch_of(device_index))


def fwd_outputs(logits2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = logits2.shape[0]
    return tuple(torch.empty(m, device=logits2.device, dtype=torch.float32) for _ in range(2))


def forward_rows(logits2, targets1, ignore_index: int, tiles: CETiles | None = None):
    """Per-row losses and log-sum-exps (M,) fp32."""
    dev = logits2.get_device()
    loss, lse = fwd_outputs(logits2)
    launch(fwd_spec(logits2, targets1, loss, lse, ignore_index=ignore_index, tiles=tiles or _table_tiles(dev)), dev)
    return loss, lse


def backward_rows(logits2, targets1, lse, scale, ignore_index: int, tiles: CETiles | None = None):
    dev = logits2.get_device()
    dlogits = torch.empty_like(logits2)
    spec = bwd_spec(logits2, targets1, lse, scale, dlogits, ignore_index=ignore_index, tiles=tiles or _table_tiles(dev))
    launch(spec, dev)
    return dlogits


def _forward(logits2, targets1, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean loss over the counted targets (NaN when none counts, as F.cross_entropy), the rows' log-sum-exp
    and the count of counted targets (fp32)."""
    row_loss, lse = forward_rows(logits2, targets1, ignore_index)
    count = (targets1 != ignore_index).sum().to(torch.float32)
    return row_loss.sum() / count, lse, count


def _backward(logits2, targets1, lse, count, grad, ignore_index: int) -> torch.Tensor:
    return backward_rows(logits2, targets1, lse, (grad.float() / count).reshape(1), ignore_index)


# --------------------------------------------------------------------------------------------------
# The custom operators and the eager path
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("gptcore::cross_entropy_fwd", mutates_args=(), device_types="cuda")
def cross_entropy_fwd_op(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean loss (a 0-dim fp32 tensor), the rows' log-sum-exp (M,) and the count of counted targets."""
    return _forward(logits, targets, ignore_index)


@cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index):
    scalar = logits.new_empty((), dtype=torch.float32)
    return scalar, fwd_outputs(logits)[1], torch.empty_like(scalar)


@torch.library.custom_op("gptcore::cross_entropy_bwd", mutates_args=(), device_types="cuda")
def cross_entropy_bwd_op(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, grad: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:  # fmt: skip
    return _backward(logits, targets, lse, count, grad, ignore_index)


@cross_entropy_bwd_op.register_fake
def _(logits, targets, lse, count, grad, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, lse, count = output
    ctx.mark_non_differentiable(lse, count)
    ctx.save_for_backward(logits, targets, lse, count)
    ctx.ignore_index = ignore_index


def _op_backward(ctx, grad, _dlse, _dcount):
    logits, targets, lse, count = ctx.saved_tensors
    return cross_entropy_bwd_op(logits, targets, lse, count, grad, ctx.ignore_index), None, None


cross_entropy_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerCrossEntropy(torch.autograd.Function):
    """The eager path: the launch helpers without the custom operators' dispatch."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse, count = _forward(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, count = ctx.saved_tensors
        return _backward(logits, targets, lse, count, grad, ctx.ignore_index), None, None


def _check(logits, targets):
    vocab = logits.shape[-1]
    if logits.dtype not in CE_DTYPES:
        raise TypeError(f"cross_entropy: logits dtype {logits.dtype} not in {CE_DTYPES}")
    if targets.numel() * vocab != logits.numel() or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"cross_entropy: targets {tuple(targets.shape)} {targets.dtype} do not match logits {tuple(logits.shape)} "
            "(one integer target per row of logits)"
        )
    if not (logits.is_cuda and targets.is_cuda):
        raise RuntimeError("cuTile cross_entropy needs CUDA tensors")
    if targets.numel() == 0:
        raise ValueError("cross_entropy got no rows")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """F.cross_entropy(logits.view(-1, V).float(), targets.view(-1), ignore_index=ignore_index) on cuTile kernels:
    a 0-dim fp32 loss, differentiable in the logits (whose dtype the gradient keeps)."""
    _check(logits, targets)
    vocab = logits.shape[-1]
    logits2, targets1 = as_rows(logits, vocab), targets.reshape(-1).contiguous()
    ignore_index = int(ignore_index)
    if not launches_directly(logits2, targets1):
        return cross_entropy_fwd_op(logits2, targets1, ignore_index)[0]
    if torch.is_grad_enabled() and logits.requires_grad:
        return _EagerCrossEntropy.apply(logits2, targets1, ignore_index)
    return _forward(logits2, targets1, ignore_index)[0]
