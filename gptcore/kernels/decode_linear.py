"""A decode step's linear layers in cuTile: y = [residual +] act(LayerNorm?(x) @ W^T + b) for the few rows of a
decoding batch, each sublayer's chain in one kernel.

Decoding one token runs every matrix of the model on a handful of rows: the time goes to launching small kernels
and reading the weights once, not to arithmetic. So each kernel takes a whole sublayer's elementwise work with
its matmul: the LayerNorm before c_attn, c_fc and the LM head (every block recomputes the rows' statistics: a
row is a few KB, the weights are the cost), the bias, GELU after c_fc, and the residual add after c_proj. A
block owns TILE_N output columns of TILE_M rows and reads its weight rows once, TILE_K columns at a time.

Rounding follows the reference model step by step, so greedy decoding picks the reference's tokens: the
LayerNorm's output is rounded to the weights' (half) dtype before the matmul, as F.layer_norm's output is; the
matmul's output (with its bias, as cuBLAS's epilogue adds it) is rounded to that dtype before GELU and before
the residual add, which runs in fp32 and is rounded to the residual's dtype (fp32 under autocast, the half dtype
in a cast model).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.bias_gelu import _phi_cdf
from gptcore.kernels.layernorm import next_pow2
from gptcore.kernels.runtime import ATTENTION_DTYPES, arch_of, launches_directly, sm_count
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch

ZERO = ct.PaddingMode.ZERO
MAX_ROWS = 64  # a block's rows at most; more rows take more blocks


@dataclass(frozen=True)
class DecodeLinearTiles:
    min_rows: int  # TILE_M at least this (the matrix unit's smallest M), at most MAX_ROWS
    tile_k: int
    min_cols: int  # TILE_N: the widest power of two from min_cols to max_cols that still gives
    max_cols: int  # blocks_per_sm blocks per SM (weights are read fastest by many blocks in flight)
    blocks_per_sm: int
    occupancy: int


# min_rows 64: with 16-row tiles a decode step of 1 or 16 rows ran several times slower than one of 64 rows on an
# H100 (results/h100/decode.csv); the unused rows of a 64-row tile are zero padding.
DECODE_LINEAR_TILES = {
    "default": DecodeLinearTiles(min_rows=64, tile_k=128, min_cols=16, max_cols=128, blocks_per_sm=1, occupancy=4),
}


def tiles_for(arch: str) -> DecodeLinearTiles:
    return DECODE_LINEAR_TILES.get(arch, DECODE_LINEAR_TILES["default"])


def tile_rows(m: int, tiles: DecodeLinearTiles) -> int:
    return min(MAX_ROWS, max(tiles.min_rows, next_pow2(m)))


def tile_cols(n: int, m: int, tiles: DecodeLinearTiles, sms: int) -> int:
    """The widest TILE_N from min_cols to max_cols whose grid still has blocks_per_sm blocks per SM."""
    row_blocks = cdiv(m, tile_rows(m, tiles))
    cols = tiles.max_cols
    while cols > tiles.min_cols and cdiv(n, cols) * row_blocks < sms * tiles.blocks_per_sm:
        cols //= 2
    return cols


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------
def decode_linear_kernel_body(
    X,
    W,
    BIAS,
    LNW,
    LNB,
    RES,
    Y,
    eps: float,
    TILE_M: ConstInt,
    TILE_N: ConstInt,
    TILE_K: ConstInt,
    HAS_LN: ConstBool,
    HAS_LNB: ConstBool,
    HAS_BIAS: ConstBool,
    GELU: ConstBool,
    HAS_RES: ConstBool,
):
    """Grid (cdiv(N, TILE_N), cdiv(M, TILE_M)). X (M, K); W (N, K) half; BIAS (N,); LNW, LNB (K,); RES, Y (M, N).
    Y = [RES +] act(LN(X) @ W^T + BIAS), rounded as the module docstring says. Absent tensors are unread."""
    n_blk, m_blk = ct.bid(0), ct.bid(1)
    k_dim = X.shape[1]
    k_tiles = ct.cdiv(k_dim, TILE_K)
    mean = ct.zeros((TILE_M, 1), dtype=ct.float32)
    rstd = ct.ones((TILE_M, 1), dtype=ct.float32)
    if HAS_LN:  # two passes over the rows (a few KB, in cache): the mean, then the variance about it
        total = ct.zeros((TILE_M, 1), dtype=ct.float32)
        for kk in range(k_tiles):
            x = ct.load(X, (m_blk, kk), (TILE_M, TILE_K), padding_mode=ZERO).astype(ct.float32)
            total = total + ct.sum(x, axis=1, keepdims=True)
        mean = total / k_dim
        sq = ct.zeros((TILE_M, 1), dtype=ct.float32)
        for kk in range(k_tiles):
            x = ct.load(X, (m_blk, kk), (TILE_M, TILE_K), padding_mode=ZERO).astype(ct.float32)
            cols = kk * TILE_K + ct.arange(TILE_K, dtype=ct.int32)[None, :]
            d = ct.where(cols < k_dim, x - mean, 0.0)
            sq = sq + ct.sum(d * d, axis=1, keepdims=True)
        rstd = ct.rsqrt(sq / k_dim + eps)
    acc = ct.zeros((TILE_M, TILE_N), dtype=ct.float32)
    for kk in range(k_tiles):
        x = ct.load(X, (m_blk, kk), (TILE_M, TILE_K), padding_mode=ZERO)
        if HAS_LN:
            xn = (x.astype(ct.float32) - mean) * rstd
            xn = xn * ct.load(LNW, (kk,), (TILE_K,), padding_mode=ZERO).astype(ct.float32)[None, :]
            if HAS_LNB:
                xn = xn + ct.load(LNB, (kk,), (TILE_K,), padding_mode=ZERO).astype(ct.float32)[None, :]
            xh = xn.astype(W.dtype)
        else:
            xh = x.astype(W.dtype)
        w_t = ct.load(W, (kk, n_blk), (TILE_K, TILE_N), order=(1, 0), padding_mode=ZERO, latency=4)
        acc = ct.mma(xh, w_t, acc)
    if HAS_BIAS:
        acc = acc + ct.load(BIAS, (n_blk,), (TILE_N,), padding_mode=ZERO).astype(ct.float32)[None, :]
    y = acc.astype(W.dtype).astype(ct.float32)  # the matmul's output in its dtype, as cuBLAS writes it
    if GELU:
        y = (y * _phi_cdf(y)).astype(W.dtype).astype(ct.float32)
    if HAS_RES:
        y = ct.load(RES, (m_blk, n_blk), (TILE_M, TILE_N), padding_mode=ZERO).astype(ct.float32) + y
    ct.store(Y, (m_blk, n_blk), y.astype(Y.dtype))


@cache
def kernel(occupancy: int):
    return ct.kernel(decode_linear_kernel_body, occupancy=occupancy)


# --------------------------------------------------------------------------------------------------
# Launch spec and the host call
# --------------------------------------------------------------------------------------------------
def spec(x, weight, bias, ln_weight, ln_bias, residual, y, *, eps: float, gelu: bool, tiles, sms: int) -> LaunchSpec:
    """x (M, K), weight (N, K), y (M, N); an absent tensor gets x in its place, unread."""
    m, n = x.shape[0], weight.shape[0]
    tm, tn = tile_rows(m, tiles), tile_cols(n, m, tiles, sms)
    args = dict(
        X=x,
        W=weight,
        BIAS=x if bias is None else bias,
        LNW=x if ln_weight is None else ln_weight,
        LNB=x if ln_bias is None else ln_bias,
        RES=x if residual is None else residual,
        Y=y,
        eps=float(eps),
        TILE_M=tm,
        TILE_N=tn,
        TILE_K=tiles.tile_k,
        HAS_LN=ln_weight is not None,
        HAS_LNB=ln_bias is not None,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        HAS_RES=residual is not None,
    )
    return LaunchSpec(decode_linear_kernel_body, kernel(tiles.occupancy), (cdiv(n, tn), cdiv(m, tm), 1), args)


@cache
def _table_tiles(device_index: int) -> DecodeLinearTiles:
    return tiles_for(arch_of(device_index))


def output(x, weight, residual) -> torch.Tensor:
    """The output: (M, N) in the residual's dtype when there is one, else the weights'."""
    dtype = weight.dtype if residual is None else residual.dtype
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)


def _forward(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu, tiles=None):
    dev = x.get_device()
    y = output(x, weight, residual)
    launch(spec(x, weight, bias, ln_weight, ln_bias, residual, y, eps=eps, gelu=gelu,
                tiles=tiles or _table_tiles(dev), sms=sm_count(dev)), dev)  # fmt: skip
    return y


@torch.library.custom_op("gptcore::decode_linear", mutates_args=(), device_types="cuda")
def decode_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    gelu: bool,
) -> torch.Tensor:
    return _forward(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu)


@decode_linear_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu):
    return output(x, weight, residual)


def _check(x, weight, bias, ln_weight, ln_bias, residual):
    m, k = x.shape if x.dim() == 2 else (None, None)
    if k is None or weight.dim() != 2 or weight.shape[1] != k:
        shapes = f"{tuple(x.shape)}, {tuple(weight.shape)}"
        raise ValueError(f"decode_linear: x must be (M, K) and weight (N, K), got {shapes}")
    if weight.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"decode_linear: the weight must be bfloat16 or float16, got {weight.dtype}")
    n = weight.shape[0]
    for name, t, shape in (("bias", bias, (n,)), ("ln_weight", ln_weight, (k,)), ("ln_bias", ln_bias, (k,)),
                           ("residual", residual, (m, n))):  # fmt: skip
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"decode_linear: {name} must be {shape}, got {tuple(t.shape)}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("decode_linear: a LayerNorm bias needs its weight")
    tensors = [t for t in (x, weight, bias, ln_weight, ln_bias, residual) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("decode_linear: every tensor needs a unit last stride")
    if not all(t.is_cuda for t in tensors):
        raise RuntimeError("decode_linear needs CUDA tensors")


def decode_linear(x, weight, bias=None, ln_weight=None, ln_bias=None, residual=None, eps=1e-5, gelu=False):
    """[residual +] act(LayerNorm(x) @ weight^T + bias) on (M, K) rows, one cuTile kernel (inference: no
    gradients). The LayerNorm is applied when ln_weight is given, GELU (exact) when `gelu`."""
    _check(x, weight, bias, ln_weight, ln_bias, residual)
    if launches_directly(x, weight, bias, ln_weight, ln_bias, residual):
        return _forward(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu)
    return decode_linear_op(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu)
