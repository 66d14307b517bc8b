"""LayerNorm in cuTile: forward (saving mean and rstd in fp32) and backward (dx, dweight, dbias).

Rows are independent, so a block takes TILE_ROWS rows at once and the whole width, padded to the next
power of two (tiles are powers of two): loads fill the tail with zeros, and the only place where the
padding could leak into a result, the variance, masks it out. Every statistic is fp32 whatever the
input dtype (fp32, bf16, fp16); weight and bias may each be None, as in F.layer_norm.

Backward: each block of a persistent grid walks over row tiles, writes dx, and keeps fp32 partial
sums of dy * xhat and dy for its rows; one torch.sum over the [2, blocks, N] partials finishes
dweight and dbias. That avoids atomics and keeps the reduction order fixed (deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

import cuda.tile as ct

from gptcore.kernels import current_arch, ensure_cuda_context

ConstInt = ct.Constant[int]
ConstBool = ct.Constant[bool]
ZERO = ct.PaddingMode.ZERO

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Tile configurations per architecture, keyed by the padded width ("small" <= 512 < "large" <= 1024).
# fwd_rows / bwd_rows: rows per tile; occ: resident blocks per SM; bwd_blocks_per_sm: persistent grid.
# sm_90 (H100): picked by measurement (`bench.py --tune`, CUDA-graph replay, 16384 rows bf16, 12
# forward and 13 backward variants per width): 384 wide, forward 16 rows occ 4 (13 us), backward 16
# rows occ 2, 4 blocks/SM (37 us); 768 wide, forward 8 rows occ 4 (28 us), backward 4 rows occ 4,
# 8 blocks/SM (55 us). Other architectures: untuned, safe defaults.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LNTiles:
    fwd_rows: int
    fwd_occ: int
    bwd_rows: int
    bwd_occ: int
    bwd_blocks_per_sm: int


LN_TILES = {
    "sm_90": {"small": LNTiles(16, 4, 16, 2, 4), "large": LNTiles(8, 4, 4, 4, 8)},
    "default": {"small": LNTiles(8, 2, 8, 2, 4), "large": LNTiles(4, 2, 4, 2, 4)},
}
SM_COUNT_FALLBACK = 132


def tiles_for(arch: str, n: int) -> LNTiles:
    table = LN_TILES.get(arch, LN_TILES["default"])
    pad = next_pow2(n)
    if pad <= 512:
        return table["small"]
    if pad <= 1024:
        return table["large"]
    # Wider rows: shrink the row count so a tile stays within ~8K fp32 values.
    base = table["large"]
    rows = max(1, min(base.fwd_rows, 8192 // pad))
    return LNTiles(rows, 1, max(1, min(base.bwd_rows, 4096 // pad)), 1, base.bwd_blocks_per_sm)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def ln_fwd_kernel_body(X, W, B, Y, MEAN, RSTD, eps,
                       N_PAD: ConstInt, TILE_ROWS: ConstInt, HAS_W: ConstBool, HAS_B: ConstBool):
    """Grid (cdiv(M, TILE_ROWS),). X, Y (M, N); W, B (N,); MEAN, RSTD (M,) fp32."""
    n = X.shape[1]
    r = ct.bid(0)
    x = ct.load(X, (r, 0), (TILE_ROWS, N_PAD), padding_mode=ZERO).astype(ct.float32)  # [TILE_ROWS, N_PAD]
    mean = ct.sum(x, axis=1, keepdims=True) / n  # [TILE_ROWS, 1]; zero padding leaves the sum alone
    cols = ct.arange(N_PAD, dtype=ct.int32)[None, :]  # [1, N_PAD]
    xc = ct.where(cols < n, x - mean, 0.0)  # padded columns would add mean^2 to the variance
    var = ct.sum(xc * xc, axis=1, keepdims=True) / n  # [TILE_ROWS, 1], biased as in torch
    rstd = ct.rsqrt(var + eps)
    y = xc * rstd  # [TILE_ROWS, N_PAD]
    if HAS_W:
        w = ct.load(W, (0,), (N_PAD,), padding_mode=ZERO).astype(ct.float32)  # [N_PAD]
        y = y * w[None, :]
    if HAS_B:
        bias = ct.load(B, (0,), (N_PAD,), padding_mode=ZERO).astype(ct.float32)
        y = y + bias[None, :]
    ct.store(Y, (r, 0), y.astype(Y.dtype))
    ct.store(MEAN, (r,), mean.reshape((TILE_ROWS,)))
    ct.store(RSTD, (r,), rstd.reshape((TILE_ROWS,)))


def ln_bwd_kernel_body(X, W, DY, MEAN, RSTD, DX, DW_PART, DB_PART,
                       N_PAD: ConstInt, TILE_ROWS: ConstInt, HAS_W: ConstBool, HAS_B: ConstBool):
    """Persistent grid (G,). DW_PART, DB_PART (G, N) fp32: this block's column sums.

    dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the N true columns.
    """
    n = X.shape[1]
    g = ct.bid(0)
    n_tiles = ct.cdiv(X.shape[0], TILE_ROWS)
    if HAS_W:
        w = ct.load(W, (0,), (N_PAD,), padding_mode=ZERO).astype(ct.float32)[None, :]  # [1, N_PAD]
    dw = ct.zeros((1, N_PAD), dtype=ct.float32)
    db = ct.zeros((1, N_PAD), dtype=ct.float32)
    for t in range(g, n_tiles, ct.num_blocks(0)):
        x = ct.load(X, (t, 0), (TILE_ROWS, N_PAD), padding_mode=ZERO).astype(ct.float32)
        dy = ct.load(DY, (t, 0), (TILE_ROWS, N_PAD), padding_mode=ZERO).astype(ct.float32)
        mean = ct.load(MEAN, (t,), (TILE_ROWS,), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        rstd = ct.load(RSTD, (t,), (TILE_ROWS,), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        # Padded rows have x = dy = mean = rstd = 0 and padded columns dy = 0, so neither adds
        # anything below; their dx is never stored.
        xhat = (x - mean) * rstd  # [TILE_ROWS, N_PAD]
        wdy = dy * w if HAS_W else dy
        c1 = ct.sum(xhat * wdy, axis=1, keepdims=True) / n  # [TILE_ROWS, 1]
        c2 = ct.sum(wdy, axis=1, keepdims=True) / n
        dx = (wdy - (xhat * c1 + c2)) * rstd
        ct.store(DX, (t, 0), dx.astype(DX.dtype))
        if HAS_W:
            dw = dw + ct.sum(dy * xhat, axis=0, keepdims=True)  # [1, N_PAD]
        if HAS_B:
            db = db + ct.sum(dy, axis=0, keepdims=True)
    if HAS_W:
        ct.store(DW_PART, (g, 0), dw)
    if HAS_B:
        ct.store(DB_PART, (g, 0), db)


@lru_cache(maxsize=None)
def fwd_kernel(occupancy: int):
    return ct.kernel(ln_fwd_kernel_body, occupancy=occupancy)


@lru_cache(maxsize=None)
def bwd_kernel(occupancy: int):
    return ct.kernel(ln_bwd_kernel_body, occupancy=occupancy)


# --------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:  # pragma: no cover
        return SM_COUNT_FALLBACK


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return x2


def layer_norm_forward(x2, weight, bias, eps: float, tiles: LNTiles | None = None):
    """x2 (M, N). Returns y (M, N) in x's dtype, mean and rstd (M,) fp32."""
    m, n = x2.shape
    tiles = tiles or tiles_for(current_arch(x2.device), n)
    y = torch.empty_like(x2, memory_format=torch.contiguous_format)
    mean = torch.empty(m, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
    # A dummy array stands in for a missing weight or bias; the constant flag keeps it unread.
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    ensure_cuda_context(x2.device.index)
    ct.launch(torch.cuda.current_stream(), (math.ceil(m / tiles.fwd_rows), 1, 1), fwd_kernel(tiles.fwd_occ),
              (x2, w, b, y, mean, rstd, float(eps), next_pow2(n), tiles.fwd_rows,
               weight is not None, bias is not None))
    return y, mean, rstd


def layer_norm_backward(x2, weight, has_bias: bool, mean, rstd, dy2, tiles: LNTiles | None = None,
                        grad_dtype: torch.dtype = torch.float32):
    """Returns dx (M, N) and the column sums (dweight, dbias) in grad_dtype, each None when not needed."""
    m, n = x2.shape
    tiles = tiles or tiles_for(current_arch(x2.device), n)
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    n_tiles = math.ceil(m / tiles.bwd_rows)
    blocks = max(1, min(n_tiles, _sm_count(x2.device.index or 0) * tiles.bwd_blocks_per_sm))
    parts = torch.empty(2, blocks, n, device=x2.device, dtype=torch.float32)
    w = weight if weight is not None else mean
    ensure_cuda_context(x2.device.index)  # autograd's worker thread may have no current context
    ct.launch(torch.cuda.current_stream(), (blocks, 1, 1), bwd_kernel(tiles.bwd_occ),
              (x2, w, dy2, mean, rstd, dx, parts[0], parts[1], next_pow2(n), tiles.bwd_rows,
               weight is not None, has_bias))
    if weight is None and not has_bias:
        return dx, None, None
    # One reduction and at most one cast for both: every extra op is a launch on the host's clock.
    lo, hi = (0 if weight is not None else 1), (2 if has_bias else 1)
    sums = parts[lo:hi].sum(dim=1)  # [k, N] fp32, fixed order: deterministic
    if grad_dtype != torch.float32:
        sums = sums.to(grad_dtype)
    dw = sums[0] if weight is not None else None
    db = sums[-1] if has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[-1]
        x2 = _rows(x, n)
        y, mean, rstd = layer_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy, x2.shape[1])
        grad_dtype = weight.dtype if weight is not None else ctx.bias_dtype or torch.float32
        dx, dw, db = layer_norm_backward(x2, weight, ctx.has_bias, mean, rstd, dy2, grad_dtype=grad_dtype)
        if db is not None and db.dtype != ctx.bias_dtype:  # weight and bias of different dtypes
            db = db.to(ctx.bias_dtype)
        dw = dw if ctx.needs_input_grad[1] else None
        db = db if ctx.needs_input_grad[2] else None
        return dx.view(ctx.x_shape), dw, db, None


def _check(x, weight, bias):
    if x.dtype not in DTYPES:
        raise TypeError(f"cuTile layer_norm supports {DTYPES}, got {x.dtype}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (n,):
            raise ValueError(f"layer_norm {name} must have shape ({n},), got {tuple(p.shape)}")
        if p.dtype not in DTYPES:
            raise TypeError(f"cuTile layer_norm {name} dtype {p.dtype} not supported")
        if not p.is_cuda:
            raise RuntimeError(f"cuTile layer_norm needs CUDA tensors ({name} is on {p.device})")
    if not x.is_cuda:
        raise RuntimeError(f"cuTile layer_norm needs CUDA tensors (x is on {x.device})")
    if x.numel() == 0:
        raise ValueError("cuTile layer_norm got an empty tensor")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm over the last dimension on cuTile kernels; differentiable in x, weight, bias."""
    _check(x, weight, bias)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    return LayerNormFunction.apply(x, weight, bias, float(eps))
