"""LayerNorm in cuTile: forward (saving mean and rstd in fp32) and backward (dx, dweight, dbias).

Rows are independent, so a block takes TILE_ROWS rows at once and the whole width: the forward as K
equal column chunks whose width is a power of two (tiles are), so that 384 = 3 x 128 and 768 = 3 x 256
need no padding; the backward as one tile of the width padded to a power of two (see Kernels).
Every statistic is fp32 whatever the input dtype (fp32, bf16, fp16); weight and bias may each be None,
as in F.layer_norm.

Backward: each block of a persistent grid walks over row tiles, writes dx, and keeps fp32 partial
sums of dy * xhat and dy for its rows; a small column-sum kernel adds up the [2, blocks, N] partials
and writes dweight and dbias in the parameters' dtypes (one launch where a torch.sum and two casts
took three). That avoids atomics and keeps the reduction order fixed (deterministic).

Host time: an eager call is dominated by the host, not the GPU (tens of microseconds of Python and
launch against ~10-40 us of kernel at 16384 rows), so the launch path is kept lean; see the launch
helpers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

import cuda.tile as ct

from gptcore.kernels import arch_of, ensure_cuda_context, stream_handle

ConstInt = ct.Constant[int]
ConstBool = ct.Constant[bool]
ZERO = ct.PaddingMode.ZERO

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Tile configurations per architecture, keyed by the padded width ("small" <= 512 < "large" <= 1024).
# fwd_rows / bwd_rows: rows per tile; occ: resident blocks per SM; *_blocks_per_sm: persistent grid;
# *_latency: the latency hint of the loads (0: none); *_warps: num_worker_warps (None: the compiler's 4);
# fwd_chunk: the forward's column chunk (a power of two; see Kernels).
# sm_90 (H100): picked by measurement (`bench.py --tune layernorm`, CUDA-graph replay, 16384 rows bf16,
# 13-17 forward and 13-19 backward variants per width, over four calls):
# - 384 wide: forward 16 rows occ 4 on a persistent grid of 4 blocks/SM, hint 3 (9.3 us; one block per
#   row tile took 10.4-11.6 us); backward 32 rows, one 8-warp block per SM, deferred column sums,
#   hint 4 (22 us; 4 warps with per-step column sums took 26-30 us).
# - 768 wide: forward 3 chunks of 256, 8 rows occ 4, 4 blocks/SM, hint 4 (18.9-19.3 us; 512 + 256 chunks
#   with 16 rows, 8 warps, 2 blocks/SM took 20.6-21.0 us, one block per row tile 25-26.6 us; a bf16 copy of
#   the same bytes takes 18.4 us); backward 8 rows occ 2, 2 blocks/SM, hint 4 (32-33 us + 3-4 us of column
#   sums; 8 warps, deferred sums or fewer rows were slower here, 42-70 us, with 1024-wide padded tiles;
#   a later sweep of this backward over rows 4-16, 1-4 blocks/SM and hints 1-6 found nothing under 32 us:
#   the next best, 4 rows occ 2, took 34 us, 3-4 blocks/SM 39-46 us; loads without TMA 48-102 us).
# - 384 wide, forward as 3 chunks of 128: 8.4-8.6 us, against 9.0-9.3 us as 256 + 128.
# The forward's chunking and its 768 tiles come from a later sweep (9 variants per width, equal chunks
# against the 512 + 256 split, in one call, confirmed by the next two); `--tune` sweeps its tiles.
# The loads' latency hints only pay in persistent loops (none for one tile per block). Other
# architectures: untuned.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LNTiles:
    fwd_rows: int
    fwd_occ: int
    bwd_rows: int
    bwd_occ: int
    bwd_blocks_per_sm: int
    bwd_latency: int = 0
    fwd_blocks_per_sm: int = 0  # forward grid: 0 = one block per row tile, k = a persistent k per SM
    fwd_latency: int = 0  # the latency hint of the forward's loads (0: none)
    bwd_defer: bool = False  # backward: keep [rows, N] column-sum tiles, reduce them once at the end
    fwd_warps: int | None = None  # num_worker_warps of each kernel (None: the compiler's choice)
    bwd_warps: int | None = None
    fwd_chunk: int = 256  # the forward's column chunk width (a power of two)


LN_TILES = {
    "sm_90": {"small": LNTiles(16, 4, 32, 1, 1, 4, fwd_blocks_per_sm=4, fwd_latency=3, bwd_defer=True,
                               bwd_warps=8, fwd_chunk=128),
              "large": LNTiles(8, 4, 8, 2, 2, 4, fwd_blocks_per_sm=4, fwd_latency=4)},
    "default": {"small": LNTiles(8, 2, 8, 2, 4, fwd_chunk=128), "large": LNTiles(4, 2, 4, 2, 4)},
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
    return LNTiles(rows, 1, max(1, min(base.bwd_rows, 4096 // pad)), 1, base.bwd_blocks_per_sm,
                   fwd_chunk=base.fwd_chunk)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fwd_chunks(n: int, chunk: int) -> tuple[int, int, bool]:
    """The forward's column chunks of a row of width n: (width C, count K, last chunk padded). C is the
    tiles' chunk, or the padded width where that is narrower: 768 by 256 -> (256, 3, False), 384 by 128 ->
    (128, 3, False), 100 by 256 -> (128, 1, True), 1600 by 256 -> (256, 7, True)."""
    c = min(chunk, next_pow2(n))
    return c, -(-n // c), n % c != 0


# --------------------------------------------------------------------------------------------------
# Kernels. The forward covers a row of width N with K chunks of C columns (a power of two; K is a
# compile-time constant, so the chunk loop is unrolled with ct.static_iter and every chunk stays in
# registers between the mean, the variance and the output). Where C does not divide N the last chunk is
# padded, its padded columns loading as 0 and masked out of the variance. The backward instead takes one
# tile of the width padded to the next power of two: measured on the H100 (16384 rows, bf16, best tiles
# each) chunked backwards were never faster: two chunks (512 + 256) took 46 vs 36 us at 768 wide and 22.4
# vs 22.0 us at 384; three equal chunks of 256, 63-83 us at 768. The forward gains from chunks: 3 x 256
# takes 19 us at 768 against 20.7 us as 512 + 256 (and with earlier tables one tile padded to 1024 took
# 27.9 us against 26.5 us for 512 + 256).
# Padded columns load as 0 and are masked where they would count (the variance); stores drop them.
# What the chunks cost the backward is the column sums: at 768, without them (dx only) 3 x 256 chunks take
# 29-30 us against 31 us for the padded tile, but every chunked form with them was slower than the padded
# one (33 us + 3 us of column-sum kernel): deferred sums 44-87 us, per-step sums 133-269 us (14 variants of
# rows, occupancy, hints and store order, in one call). The padded backward is also at cuTile's own floor
# for its tiling: a plain cuTile add on the same tiles (8 rows, 2 blocks/SM) takes 34 us, torch's add 27 us.
# --------------------------------------------------------------------------------------------------
def _load(A, index, shape, LATENCY):
    """A tile as fp32; the latency hint (a compile-time constant) only when set."""
    if LATENCY > 0:
        return ct.load(A, index, shape, padding_mode=ZERO, latency=LATENCY).astype(ct.float32)
    return ct.load(A, index, shape, padding_mode=ZERO).astype(ct.float32)


def _affine(y, W, B, chunk, C, HAS_W, HAS_B):
    """y * w + b over one column chunk ([rows, C]); chunk is the tile index of the chunk in the row."""
    if HAS_W:
        y = y * ct.load(W, (chunk,), (C,), padding_mode=ZERO).astype(ct.float32)[None, :]
    if HAS_B:
        y = y + ct.load(B, (chunk,), (C,), padding_mode=ZERO).astype(ct.float32)[None, :]
    return y


def ln_fwd_kernel_body(X, W, B, Y, STATS, eps, C: ConstInt, K: ConstInt, PAD_LAST: ConstBool,
                       TILE_ROWS: ConstInt, HAS_W: ConstBool, HAS_B: ConstBool, LATENCY: ConstInt):
    """Grid (G,) over the cdiv(M, TILE_ROWS) row tiles: one tile per block when G is that count, else a
    persistent loop. X, Y (M, N), N covered by K chunks of C columns; W, B (N,); STATS (2, M) fp32: mean,
    rstd."""
    n = X.shape[1]
    for r in range(ct.bid(0), ct.cdiv(X.shape[0], TILE_ROWS), ct.num_blocks(0)):
        xs = ()
        total = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)
        for k in ct.static_iter(range(K)):
            xk = _load(X, (r, k), (TILE_ROWS, C), LATENCY)  # [TILE_ROWS, C]
            xs += (xk,)
            total = total + ct.sum(xk, axis=1, keepdims=True)
        mean = total / n  # [TILE_ROWS, 1]; zero padding leaves the sum alone
        var = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)
        centred = ()
        for k in ct.static_iter(range(K)):
            xc = xs[k] - mean
            if PAD_LAST and k == K - 1:  # padded columns would add mean^2 to the variance
                xc = ct.where(k * C + ct.arange(C, dtype=ct.int32)[None, :] < n, xc, 0.0)
            centred += (xc,)
            var = var + ct.sum(xc * xc, axis=1, keepdims=True)
        rstd = ct.rsqrt(var / n + eps)  # [TILE_ROWS, 1], biased variance as in torch
        for k in ct.static_iter(range(K)):
            ct.store(Y, (r, k), _affine(centred[k] * rstd, W, B, k, C, HAS_W, HAS_B).astype(Y.dtype))
        ct.store(STATS, (0, r), mean.reshape((1, TILE_ROWS)))
        ct.store(STATS, (1, r), rstd.reshape((1, TILE_ROWS)))


def ln_bwd_kernel_body(X, W, DY, STATS, DX, PARTS, N_PAD: ConstInt, TILE_ROWS: ConstInt,
                       HAS_W: ConstBool, HAS_B: ConstBool, LATENCY: ConstInt, DEFER: ConstBool):
    """Persistent grid (G,). PARTS (2, G, N) fp32: this block's column sums of dy*xhat and dy.

    dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the N true columns.
    One tile of N_PAD columns per row (see Kernels above). Padded rows have x = dy = mean = rstd = 0 and
    padded columns dy = 0, so neither adds anything to a sum below; their dx is never stored.
    """
    n = X.shape[1]
    g = ct.bid(0)
    n_tiles = ct.cdiv(X.shape[0], TILE_ROWS)
    if HAS_W:
        w = ct.load(W, (0,), (N_PAD,), padding_mode=ZERO).astype(ct.float32)[None, :]  # [1, N_PAD]
    # Column sums of dy * xhat and of dy: per step into [1, N_PAD] (a cross-row reduction every step),
    # or with DEFER into [TILE_ROWS, N_PAD] (elementwise adds; one reduction at the end, more registers).
    acc_rows = TILE_ROWS if DEFER else 1
    dw = ct.zeros((acc_rows, N_PAD), dtype=ct.float32)
    db = ct.zeros((acc_rows, N_PAD), dtype=ct.float32)
    for t in range(g, n_tiles, ct.num_blocks(0)):
        mean = ct.load(STATS, (0, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        rstd = ct.load(STATS, (1, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        xhat = (_load(X, (t, 0), (TILE_ROWS, N_PAD), LATENCY) - mean) * rstd  # [TILE_ROWS, N_PAD]
        dy = _load(DY, (t, 0), (TILE_ROWS, N_PAD), LATENCY)
        wdy = dy * w if HAS_W else dy
        c1 = ct.sum(xhat * wdy, axis=1, keepdims=True) / n  # [TILE_ROWS, 1]
        c2 = ct.sum(wdy, axis=1, keepdims=True) / n
        ct.store(DX, (t, 0), ((wdy - (xhat * c1 + c2)) * rstd).astype(DX.dtype))
        if HAS_W:
            dw = dw + (dy * xhat if DEFER else ct.sum(dy * xhat, axis=0, keepdims=True))
        if HAS_B:
            db = db + (dy if DEFER else ct.sum(dy, axis=0, keepdims=True))
    if HAS_W:
        ct.store(PARTS, (0, g, 0), ct.sum(dw, axis=0, keepdims=True).reshape((1, 1, N_PAD)))
    if HAS_B:
        ct.store(PARTS, (1, g, 0), ct.sum(db, axis=0, keepdims=True).reshape((1, 1, N_PAD)))


def ln_colsum_kernel_body(PARTS, DW, DB, TILE_G: ConstInt, TILE_N: ConstInt, HAS_W: ConstBool,
                          HAS_B: ConstBool):
    """Grid (cdiv(N, TILE_N),). PARTS (2, G, N) fp32, the backward's per-block column sums: DW and DB (N,)
    get their sums over G, in fp32, stored in their own dtypes. Padded rows of PARTS load as 0."""
    c = ct.bid(0)
    dw = ct.zeros((TILE_G, TILE_N), dtype=ct.float32)
    db = ct.zeros((TILE_G, TILE_N), dtype=ct.float32)
    for t in range(ct.cdiv(PARTS.shape[1], TILE_G)):
        if HAS_W:
            dw = dw + ct.load(PARTS, (0, t, c), (1, TILE_G, TILE_N),
                              padding_mode=ZERO).reshape((TILE_G, TILE_N))  # [TILE_G, TILE_N]
        if HAS_B:
            db = db + ct.load(PARTS, (1, t, c), (1, TILE_G, TILE_N),
                              padding_mode=ZERO).reshape((TILE_G, TILE_N))
    if HAS_W:
        ct.store(DW, (c,), ct.sum(dw, axis=0).astype(DW.dtype))
    if HAS_B:
        ct.store(DB, (c,), ct.sum(db, axis=0).astype(DB.dtype))


COLSUM_TILE_G = 128  # partial rows per step: the backward grids have 132 or 264 blocks on the H100
COLSUM_TILE_N = 32  # columns per block: 12 blocks at 384 wide, 24 at 768


@lru_cache(maxsize=None)
def colsum_kernel():
    return ct.kernel(ln_colsum_kernel_body)


@lru_cache(maxsize=None)
def fwd_kernel(occupancy: int, warps: int | None = None):
    return ct.kernel(ln_fwd_kernel_body, occupancy=occupancy, num_worker_warps=warps)


@lru_cache(maxsize=None)
def bwd_kernel(occupancy: int, warps: int | None = None):
    return ct.kernel(ln_bwd_kernel_body, occupancy=occupancy, num_worker_warps=warps)


# --------------------------------------------------------------------------------------------------
# Launch helpers. Every call costs host time that, at these sizes, is longer than the kernels, so the
# work that depends only on (device, width, tiles) is done once per key (`_plan`), the stream handle is
# taken raw, and each direction allocates what it writes in as few tensors as it can.
# Programmatic dependent launch (ct.launch(..., programmatic_dependent_launch=True), each kernel waiting in
# ct.grid_dependency_control_wait) was measured and is not used: at 768 wide it saved 0.4 us on backward +
# column sums (2-3 us only between a forward and a backward launched back to back, as in no model), and at
# 384 it slowed the backward from 18.6 to 22.9 us.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LNPlan:
    tiles: LNTiles
    fwd_chunks: tuple[int, int, bool]  # the forward's column chunks: width, count, last one padded
    n_pad: int  # the backward's padded width
    fwd: object  # compiled-on-first-launch kernel objects
    bwd: object
    max_bwd_blocks: int  # the persistent backward grid's size cap: SMs x blocks per SM
    max_fwd_blocks: int  # the same for the forward; 0: one block per row tile


@lru_cache(maxsize=None)
def _plan(device_index: int, n: int, tiles: LNTiles | None) -> LNPlan:
    tiles = tiles or tiles_for(arch_of(device_index), n)
    try:
        sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:  # pragma: no cover
        sms = SM_COUNT_FALLBACK
    return LNPlan(tiles, fwd_chunks(n, tiles.fwd_chunk), next_pow2(n), fwd_kernel(tiles.fwd_occ, tiles.fwd_warps),
                  bwd_kernel(tiles.bwd_occ, tiles.bwd_warps),
                  sms * tiles.bwd_blocks_per_sm, sms * tiles.fwd_blocks_per_sm)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return x2


def layer_norm_forward(x2, weight, bias, eps: float, tiles: LNTiles | None = None):
    """x2 (M, N). Returns y (M, N) in x's dtype and stats (2, M) fp32: the rows' mean and rstd."""
    m, n = x2.shape
    dev = x2.get_device()
    plan = _plan(dev, n, tiles)
    y = torch.empty_like(x2, memory_format=torch.contiguous_format)
    stats = torch.empty(2, m, device=x2.device, dtype=torch.float32)
    # A dummy array stands in for a missing weight or bias; the constant flag keeps it unread.
    ensure_cuda_context(dev)
    rows = plan.tiles.fwd_rows
    blocks = (m + rows - 1) // rows
    if plan.max_fwd_blocks:
        blocks = min(blocks, plan.max_fwd_blocks)
    ct.launch(stream_handle(dev), (blocks, 1, 1), plan.fwd,
              (x2, stats if weight is None else weight, stats if bias is None else bias, y, stats, eps,
               *plan.fwd_chunks, rows, weight is not None, bias is not None, plan.tiles.fwd_latency))
    return y, stats


def layer_norm_backward(x2, weight, bias_dtype: torch.dtype | None, stats, dy2, tiles: LNTiles | None = None):
    """Returns dx (M, N) in x's dtype, dweight in the weight's dtype (None without a weight) and dbias in
    `bias_dtype` (None without a bias)."""
    m, n = x2.shape
    dev = x2.get_device()
    plan = _plan(dev, n, tiles)
    t = plan.tiles
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    blocks = max(1, min((m + t.bwd_rows - 1) // t.bwd_rows, plan.max_bwd_blocks))
    has_weight, has_bias = weight is not None, bias_dtype is not None
    parts = torch.empty(2, blocks, n, device=x2.device, dtype=torch.float32)
    ensure_cuda_context(dev)  # autograd's worker thread may have no current context
    stream = stream_handle(dev)
    ct.launch(stream, (blocks, 1, 1), plan.bwd,
              (x2, weight if has_weight else stats, dy2, stats, dx, parts, plan.n_pad, t.bwd_rows,
               has_weight, has_bias, t.bwd_latency, t.bwd_defer))
    if not (has_weight or has_bias):
        return dx, None, None
    dw = torch.empty(n, device=x2.device, dtype=weight.dtype) if has_weight else None
    db = torch.empty(n, device=x2.device, dtype=bias_dtype) if has_bias else None
    ct.launch(stream, ((n + COLSUM_TILE_N - 1) // COLSUM_TILE_N, 1, 1), colsum_kernel(),
              (parts, stats if dw is None else dw, stats if db is None else db, COLSUM_TILE_G, COLSUM_TILE_N,
               has_weight, has_bias))
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[-1]
        x2 = _rows(x, n)
        y, stats = layer_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, stats)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, stats = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(x2, weight, ctx.bias_dtype, stats, _rows(dy, x2.shape[1]))
        return (dx.view(dy.shape), dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None)


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
