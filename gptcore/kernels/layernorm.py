"""LayerNorm in cuTile: forward (saving mean and rstd in fp32) and backward (dx, dweight, dbias).

Rows are independent, so a block takes TILE_ROWS rows at once and the whole width. Every statistic is
fp32 whatever the input dtype (fp32, bf16, fp16); weight and bias may each be None, as in F.layer_norm.
The backward's weight and bias gradients are per-block partial column sums, added up by a small second
kernel in a fixed order: deterministic, and no atomics.

The measurements behind the tile choices are in results/h100/kernel-design.csv and
results/h100/tune-layernorm.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.runtime import LAYER_NORM_DTYPES, arch_of, launches_directly, sm_count
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch

ZERO = ct.PaddingMode.ZERO


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LNTiles:
    """The launch configuration of the forward and backward kernels for one range of widths."""

    fwd_rows: int  # rows per forward tile
    fwd_occ: int  # the forward's occupancy hint: resident blocks per SM
    bwd_rows: int  # rows per backward tile
    bwd_occ: int
    bwd_blocks_per_sm: int  # the backward always runs on a persistent grid of this many blocks per SM
    fwd_blocks_per_sm: int = 0  # forward grid: 0 = one block per row tile, k = a persistent k blocks per SM
    fwd_latency: int = 0  # latency hint of the forward's loads (0: none; it pays only in persistent loops)
    fwd_warps: int | None = None  # num_worker_warps (None: the compiler's choice)
    fwd_chunk: int = 256  # the forward's column chunk width (a power of two)
    bwd_latency: int = 0
    bwd_warps: int | None = None
    bwd_defer: bool = False  # keep [rows, N] column-sum tiles and reduce them once at the end


# Keyed by the padded width: "small" up to 512, "large" up to 1024 (wider rows shrink the row count).
# sm_90: the fastest of the sweeps on an H100 at 384 and 768 wide (16384 rows, bf16, CUDA-graph replay).
LN_TILES = {
    "sm_90": {
        "small": LNTiles(
            fwd_rows=16,
            fwd_occ=4,
            fwd_blocks_per_sm=4,
            fwd_latency=3,
            fwd_chunk=128,
            bwd_rows=32,
            bwd_occ=1,
            bwd_blocks_per_sm=1,
            bwd_latency=4,
            bwd_warps=8,
            bwd_defer=True,
        ),
        "large": LNTiles(
            fwd_rows=8,
            fwd_occ=4,
            fwd_blocks_per_sm=4,
            fwd_latency=4,
            fwd_chunk=256,
            bwd_rows=8,
            bwd_occ=2,
            bwd_blocks_per_sm=2,
            bwd_latency=4,
        ),
    },
    # Other architectures are untuned: compile-checked by the gate only.
    "default": {
        "small": LNTiles(fwd_rows=8, fwd_occ=2, fwd_chunk=128, bwd_rows=8, bwd_occ=2, bwd_blocks_per_sm=4),
        "large": LNTiles(fwd_rows=4, fwd_occ=2, fwd_chunk=256, bwd_rows=4, bwd_occ=2, bwd_blocks_per_sm=4),
    },
}


def tiles_for(arch: str, n: int) -> LNTiles:
    table = LN_TILES.get(arch, LN_TILES["default"])
    pad = next_pow2(n)
    if pad <= 512:
        return table["small"]
    if pad <= 1024:
        return table["large"]
    # Wider rows: shrink the row count so a tile stays within ~8K fp32 values (4K in the backward).
    base = table["large"]
    return replace(
        base,
        fwd_rows=max(1, min(base.fwd_rows, 8192 // pad)),
        fwd_occ=1,
        fwd_blocks_per_sm=0,
        fwd_latency=0,
        fwd_warps=None,
        bwd_rows=max(1, min(base.bwd_rows, 4096 // pad)),
        bwd_occ=1,
        bwd_latency=0,
        bwd_warps=None,
        bwd_defer=False,
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fwd_chunks(n: int, chunk: int) -> tuple[int, int, bool]:
    """The forward's column chunks of a row of width n: (width C, count K, last chunk padded). C is the
    tiles' chunk, or the padded width where that is narrower: 768 by 256 -> (256, 3, False), 384 by 128 ->
    (128, 3, False), 100 by 256 -> (128, 1, True), 1600 by 256 -> (256, 7, True)."""
    c = min(chunk, next_pow2(n))
    return c, -(-n // c), n % c != 0


# --------------------------------------------------------------------------------------------------
# Kernels. The forward covers a row with K chunks of C columns (C a power of two, K a compile-time
# constant unrolled with ct.static_iter), so 768 = 3 x 256 needs no padding and every chunk stays in
# registers between the mean, the variance and the output. The backward takes one tile of the width
# padded to a power of two, so its weight and bias column sums stay one reduction per tile.
# Padded columns load as 0 and are masked where they would count (the variance); stores drop them.
# --------------------------------------------------------------------------------------------------
def load_f32(A, index, shape, LATENCY):
    """A tile as fp32; the latency hint (a compile-time constant) only when set."""
    if LATENCY > 0:
        return ct.load(A, index, shape, padding_mode=ZERO, latency=LATENCY).astype(ct.float32)
    return ct.load(A, index, shape, padding_mode=ZERO).astype(ct.float32)


def affine(y, W, B, chunk, C, HAS_W, HAS_B):
    """y * w + b over one column chunk ([rows, C]); chunk is the tile index of the chunk in the row."""
    if HAS_W:
        y = y * ct.load(W, (chunk,), (C,), padding_mode=ZERO).astype(ct.float32)[None, :]
    if HAS_B:
        y = y + ct.load(B, (chunk,), (C,), padding_mode=ZERO).astype(ct.float32)[None, :]
    return y


def ln_fwd_kernel_body(
    X,
    W,
    B,
    Y,
    STATS,
    eps,
    C: ConstInt,
    K: ConstInt,
    PAD_LAST: ConstBool,
    TILE_ROWS: ConstInt,
    HAS_W: ConstBool,
    HAS_B: ConstBool,
    LATENCY: ConstInt,
):
    """Grid (G,) over the cdiv(M, TILE_ROWS) row tiles: one tile per block when G is that count, else a
    persistent loop. X, Y (M, N), N covered by K chunks of C columns; W, B (N,); STATS (2, M) fp32: mean,
    rstd."""
    n = X.shape[1]
    for r in range(ct.bid(0), ct.cdiv(X.shape[0], TILE_ROWS), ct.num_blocks(0)):
        xs = ()
        total = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)
        for k in ct.static_iter(range(K)):
            xk = load_f32(X, (r, k), (TILE_ROWS, C), LATENCY)  # [TILE_ROWS, C]
            xs += (xk,)
            total = total + ct.sum(xk, axis=1, keepdims=True)
        normalize_and_store(xs, total, n, eps, r, W, B, Y, STATS, C, K, PAD_LAST, TILE_ROWS, HAS_W, HAS_B)


def normalize_and_store(xs, total, n, eps, r, W, B, Y, STATS, C, K, PAD_LAST, TILE_ROWS, HAS_W, HAS_B):
    """The rest of a LayerNorm forward for row tile r, from its K fp32 chunks `xs` ([TILE_ROWS, C] each) and
    their row sums `total`: stores y = (x - mean) * rstd * w + b into Y and the mean and rstd into STATS."""
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
        ct.store(Y, (r, k), affine(centred[k] * rstd, W, B, k, C, HAS_W, HAS_B).astype(Y.dtype))
    ct.store(STATS, (0, r), mean.reshape((1, TILE_ROWS)))
    ct.store(STATS, (1, r), rstd.reshape((1, TILE_ROWS)))


def ln_bwd_kernel_body(
    X,
    W,
    DY,
    STATS,
    DX,
    PARTS,
    N_PAD: ConstInt,
    TILE_ROWS: ConstInt,
    HAS_W: ConstBool,
    HAS_B: ConstBool,
    LATENCY: ConstInt,
    DEFER: ConstBool,
):
    """Persistent grid (G,). PARTS (2, G, N) fp32: this block's column sums of dy*xhat and dy.

    dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the N true columns.
    Padded rows have x = dy = mean = rstd = 0 and padded columns dy = 0, so neither adds anything to a sum
    below; their dx is never stored.
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
        xhat = (load_f32(X, (t, 0), (TILE_ROWS, N_PAD), LATENCY) - mean) * rstd  # [TILE_ROWS, N_PAD]
        dy = load_f32(DY, (t, 0), (TILE_ROWS, N_PAD), LATENCY)
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


def ln_colsum_kernel_body(PARTS, DW, DB, TILE_G: ConstInt, TILE_N: ConstInt, HAS_W: ConstBool, HAS_B: ConstBool):
    """Grid (cdiv(N, TILE_N),). PARTS (2, G, N) fp32, the backward's per-block column sums: DW and DB (N,)
    get their sums over G, in fp32, stored in their own dtypes. Padded rows of PARTS load as 0."""
    c = ct.bid(0)
    dw = ct.zeros((TILE_G, TILE_N), dtype=ct.float32)
    db = ct.zeros((TILE_G, TILE_N), dtype=ct.float32)
    for t in range(ct.cdiv(PARTS.shape[1], TILE_G)):
        if HAS_W:
            dw = dw + ct.load(PARTS, (0, t, c), (1, TILE_G, TILE_N), padding_mode=ZERO).reshape(
                (TILE_G, TILE_N)
            )  # [TILE_G, TILE_N]
        if HAS_B:
            db = db + ct.load(PARTS, (1, t, c), (1, TILE_G, TILE_N), padding_mode=ZERO).reshape((TILE_G, TILE_N))
    if HAS_W:
        ct.store(DW, (c,), ct.sum(dw, axis=0).astype(DW.dtype))
    if HAS_B:
        ct.store(DB, (c,), ct.sum(db, axis=0).astype(DB.dtype))


COLSUM_TILE_G = 128  # partial rows per step: a persistent backward grid has one to a few blocks per SM
COLSUM_TILE_N = 32  # columns per block: 12 blocks at 384 wide, 24 at 768


@cache
def colsum_kernel():
    return ct.kernel(ln_colsum_kernel_body)


@cache
def fwd_kernel(occupancy: int, warps: int | None = None):
    return ct.kernel(ln_fwd_kernel_body, occupancy=occupancy, num_worker_warps=warps)


@cache
def bwd_kernel(occupancy: int, warps: int | None = None):
    return ct.kernel(ln_bwd_kernel_body, occupancy=occupancy, num_worker_warps=warps)


# --------------------------------------------------------------------------------------------------
# Launch specs: each kernel's grid and arguments, by name, from the tensors and the tiles. A missing weight
# or bias gets a dummy array in its place, which the constant HAS_W / HAS_B flag keeps unread.
# --------------------------------------------------------------------------------------------------
def fwd_spec(x2, weight, bias, y, stats, *, eps: float, tiles: LNTiles, sm_count: int) -> LaunchSpec:
    """x2, y (M, N); weight, bias (N,) or None; stats (2, M) fp32."""
    m, n = x2.shape
    c, k, pad_last = fwd_chunks(n, tiles.fwd_chunk)
    blocks = cdiv(m, tiles.fwd_rows)
    if tiles.fwd_blocks_per_sm:  # a persistent grid
        blocks = min(blocks, sm_count * tiles.fwd_blocks_per_sm)
    args = dict(
        X=x2,
        W=stats if weight is None else weight,
        B=stats if bias is None else bias,
        Y=y,
        STATS=stats,
        eps=eps,
        C=c,
        K=k,
        PAD_LAST=pad_last,
        TILE_ROWS=tiles.fwd_rows,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        LATENCY=tiles.fwd_latency,
    )
    return LaunchSpec(ln_fwd_kernel_body, fwd_kernel(tiles.fwd_occ, tiles.fwd_warps), (blocks, 1, 1), args)


def bwd_blocks(m: int, tiles: LNTiles, sm_count: int) -> int:
    """The backward's persistent grid size for M rows: the rows of its column-sum partials."""
    return max(1, min(cdiv(m, tiles.bwd_rows), sm_count * tiles.bwd_blocks_per_sm))


def bwd_spec(x2, weight, dy2, stats, dx, parts, *, has_bias: bool, tiles: LNTiles) -> LaunchSpec:
    """parts (2, G, N) fp32: one row of column sums per block of the grid (G = bwd_blocks)."""
    args = dict(
        X=x2,
        W=stats if weight is None else weight,
        DY=dy2,
        STATS=stats,
        DX=dx,
        PARTS=parts,
        N_PAD=next_pow2(x2.shape[1]),
        TILE_ROWS=tiles.bwd_rows,
        HAS_W=weight is not None,
        HAS_B=has_bias,
        LATENCY=tiles.bwd_latency,
        DEFER=tiles.bwd_defer,
    )
    kernel = bwd_kernel(tiles.bwd_occ, tiles.bwd_warps)
    return LaunchSpec(ln_bwd_kernel_body, kernel, (parts.shape[1], 1, 1), args)


def colsum_spec(parts, dw, db) -> LaunchSpec:
    """dw, db (N,) or None: the sums of the backward's partials in their own dtypes."""
    args = dict(
        PARTS=parts,
        DW=parts if dw is None else dw,
        DB=parts if db is None else db,
        TILE_G=COLSUM_TILE_G,
        TILE_N=COLSUM_TILE_N,
        HAS_W=dw is not None,
        HAS_B=db is not None,
    )
    return LaunchSpec(ln_colsum_kernel_body, colsum_kernel(), (cdiv(parts.shape[2], COLSUM_TILE_N), 1, 1), args)


# --------------------------------------------------------------------------------------------------
# Launch helpers: allocate the outputs, build the specs, launch. `tiles` is an explicit configuration (a
# tuning candidate); None takes the architecture's table.
# --------------------------------------------------------------------------------------------------
@cache
def _table_tiles(device_index: int, n: int) -> LNTiles:
    return tiles_for(arch_of(device_index), n)


def as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x as (M, n) rows for a kernel: a view when its layout allows (unit last stride, 16-byte aligned rows)."""
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return x2


def fwd_outputs(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's empty y (M, N) and stats (2, M) fp32."""
    y = torch.empty_like(x2, memory_format=torch.contiguous_format)
    return y, torch.empty(2, x2.shape[0], device=x2.device, dtype=torch.float32)


def bwd_outputs(x2: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's empty dx (M, N) and column-sum partials (2, blocks, N) fp32."""
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    return dx, torch.empty(2, blocks, x2.shape[1], device=x2.device, dtype=torch.float32)


def layer_norm_forward(x2, weight, bias, *, eps: float, tiles: LNTiles | None = None):
    """x2 (M, N). Returns y (M, N) in x's dtype and stats (2, M) fp32: the rows' mean and rstd."""
    dev = x2.get_device()
    tiles = tiles or _table_tiles(dev, x2.shape[1])
    y, stats = fwd_outputs(x2)
    launch(fwd_spec(x2, weight, bias, y, stats, eps=eps, tiles=tiles, sm_count=sm_count(dev)), dev)
    return y, stats


def layer_norm_backward(
    x2,
    weight,
    stats,
    dy2,
    *,
    bias_dtype: torch.dtype | None,
    weight_grad: bool = True,
    tiles: LNTiles | None = None,
):
    """Returns dx (M, N) in x's dtype, dweight in the weight's dtype (None without a weight, or when not
    `weight_grad`) and dbias in `bias_dtype` (None when bias_dtype is None: no bias, or none wanted)."""
    m, n = x2.shape
    dev = x2.get_device()
    tiles = tiles or _table_tiles(dev, n)
    dx, parts = bwd_outputs(x2, bwd_blocks(m, tiles, sm_count(dev)))
    has_bias = bias_dtype is not None
    launch(bwd_spec(x2, weight, dy2, stats, dx, parts, has_bias=has_bias, tiles=tiles), dev)
    weight_grad = weight_grad and weight is not None
    if not weight_grad and not has_bias:  # the column sums' kernel is skipped: nothing wants them
        return dx, None, None
    dw = torch.empty(n, device=x2.device, dtype=weight.dtype) if weight_grad else None
    db = torch.empty(n, device=x2.device, dtype=bias_dtype) if has_bias else None
    launch(colsum_spec(parts, dw, db), dev)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# The custom operators: opaque to torch.compile (no graph break), with shapes for fake tensors and the
# backward registered, so the model compiles with fullgraph=True, exports and captures in CUDA graphs.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("gptcore::layer_norm_fwd", mutates_args=(), device_types="cuda")
def layer_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, stats = layer_norm_forward(as_rows(x, x.shape[-1]), weight, bias, eps=eps)
    return y.view(x.shape), stats


@layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    y, stats = fwd_outputs(x.reshape(-1, x.shape[-1]))
    return y.view(x.shape), stats


@torch.library.custom_op("gptcore::layer_norm_bwd", mutates_args=(), device_types="cuda")
def layer_norm_bwd_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, stats: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, and dweight / dbias in their parameters' dtypes (empty where the parameter is None)."""
    n = x.shape[-1]
    bias_dtype = None if bias is None else bias.dtype
    dx, dw, db = layer_norm_backward(as_rows(x, n), weight, stats, as_rows(dy, n), bias_dtype=bias_dtype)
    return dx.view(dy.shape), x.new_empty(0) if dw is None else dw, x.new_empty(0) if db is None else db


@layer_norm_bwd_op.register_fake
def _(x, weight, bias, stats, dy):
    n = x.shape[-1]
    return (
        torch.empty_like(dy, memory_format=torch.contiguous_format),
        x.new_empty(0) if weight is None else weight.new_empty(n),
        x.new_empty(0) if bias is None else bias.new_empty(n),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, output[1])


def _backward(ctx, dy, _dstats):
    x, weight, bias, stats = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd_op(x, weight, bias, stats, dy)
    return dx, None if weight is None else dw, None if bias is None else db, None


layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias):
    if x.dtype not in LAYER_NORM_DTYPES:
        raise TypeError(f"cuTile layer_norm supports {LAYER_NORM_DTYPES}, got {x.dtype}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (n,):
            raise ValueError(f"layer_norm {name} must have shape ({n},), got {tuple(p.shape)}")
        if p.dtype not in LAYER_NORM_DTYPES:
            raise TypeError(f"cuTile layer_norm {name} dtype {p.dtype} not supported")
        if not p.is_cuda:
            raise RuntimeError(f"cuTile layer_norm needs CUDA tensors ({name} is on {p.device})")
    if not x.is_cuda:
        raise RuntimeError(f"cuTile layer_norm needs CUDA tensors (x is on {x.device})")
    if x.numel() == 0:
        raise ValueError("cuTile layer_norm got an empty tensor")


class _EagerLayerNorm(torch.autograd.Function):
    """The eager path: autograd calls the launch helpers directly, without the custom operators' dispatch
    (their Python layers cost more host time than the kernels take at small sizes), and skips the
    gradients nobody asked for. Traced code and tensor subclasses take the operators (`launches_directly`
    decides)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, stats = layer_norm_forward(as_rows(x, x.shape[-1]), weight, bias, eps=eps)
        ctx.save_for_backward(x, weight, stats)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        n = x.shape[-1]
        _, want_w, want_b, _ = ctx.needs_input_grad
        bias_dtype = ctx.bias_dtype if want_b else None
        dx, dw, db = layer_norm_backward(
            as_rows(x, n), weight, stats, as_rows(dy, n), bias_dtype=bias_dtype, weight_grad=want_w
        )
        return dx.view(dy.shape), dw, db, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """F.layer_norm over the last dimension on cuTile kernels; differentiable in x, weight, bias."""
    _check(x, weight, bias)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    eps = float(eps)
    if not launches_directly(x, weight, bias):
        return layer_norm_fwd_op(x, weight, bias, eps)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _EagerLayerNorm.apply(x, weight, bias, eps)
    y, _ = layer_norm_forward(as_rows(x, x.shape[-1]), weight, bias, eps=eps)
    return y.view(x.shape)
