"""Residual add + dropout + LayerNorm in cuTile, forward and backward, each in one pass over the rows.

Between two sublayers a pre-LayerNorm transformer computes x = x + dropout(branch + branch_bias), then
y = LayerNorm(x): as separate ops that is a bias add, a dropout (its mask stored), a residual add, a cast and a
LayerNorm, each reading and writing the whole activation. Here one forward kernel reads the residual x and the
branch (a matmul's output without its bias) and writes the new residual x_out, y in the matmul's half dtype
(what the next matmul reads, so no cast) and the rows' mean and rstd. The backward kernel reads x_out, the
statistics, dy and the residual's own gradient, and writes dx (the residual's gradient) and dbranch (the
gradient of the branch, its dropout mask regenerated from the call's keys, never stored), with per-block
partial column sums of dy * xhat, dy and dbranch: the gradients of the LayerNorm weight and bias and of the
branch's bias, added up by gptcore.kernels.column_sums in a fixed order (no atomics).

x may be absent (x_out = dropout(branch + branch_bias): the embeddings' dropout before the first LayerNorm), so
may the branch bias, the LayerNorm weight and bias, and the residual's gradient (the final LayerNorm's x_out
feeds nothing else). Statistics are fp32 whatever the dtypes. The dropout hash is the attention dropout's
(gptcore.kernels.tile_random), row r of the call counted as r and feature c as c; dropout.rows_keep_mask
computes the same mask in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.column_sums import column_sums
from gptcore.kernels.dropout import dropout_rng, dropout_threshold
from gptcore.kernels.layernorm import as_rows, fwd_chunks, load_f32, next_pow2, normalize_and_store
from gptcore.kernels.runtime import LAYER_NORM_DTYPES, arch_of, launches_directly, sm_count
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch
from gptcore.kernels.tile_random import call_keys, col_hashes, keep, row_hashes

ZERO = ct.PaddingMode.ZERO
PARTIAL_SUMS = 3  # the backward's column sums: dy * xhat (LayerNorm weight), dy (its bias), dbranch (branch bias)


@dataclass(frozen=True)
class ADLTiles:
    """Launch configuration of the forward and backward kernels for one range of widths."""

    fwd_rows: int  # rows per forward tile
    fwd_occ: int  # occupancy hint: resident blocks per SM
    fwd_blocks_per_sm: int  # the forward's persistent grid (0: one block per row tile)
    fwd_latency: int  # latency hint of the forward's loads (0: none)
    fwd_chunk: int  # the forward's column chunk width (a power of two)
    bwd_rows: int
    bwd_occ: int
    bwd_blocks_per_sm: int  # the backward always runs on a persistent grid
    bwd_latency: int


# Keyed by the padded width like the LayerNorm tables: "small" up to 512, "large" up to 1024. sm_90: the fastest
# of the sweeps on an H100 at the presets' training shapes, dropout on (results/h100/tune-fused.json).
ADL_TILES = {
    "sm_90": {
        "small": ADLTiles(4, 4, 8, 3, 128, bwd_rows=8, bwd_occ=2, bwd_blocks_per_sm=2, bwd_latency=0),
        "large": ADLTiles(8, 4, 4, 4, 256, bwd_rows=4, bwd_occ=2, bwd_blocks_per_sm=4, bwd_latency=2),
    },
    "default": {  # untuned: compile-checked by the gate only
        "small": ADLTiles(8, 2, 0, 0, 128, bwd_rows=8, bwd_occ=2, bwd_blocks_per_sm=4, bwd_latency=0),
        "large": ADLTiles(4, 2, 0, 0, 256, bwd_rows=4, bwd_occ=2, bwd_blocks_per_sm=4, bwd_latency=0),
    },
}


def tiles_for(arch: str, n: int) -> ADLTiles:
    table = ADL_TILES.get(arch, ADL_TILES["default"])
    pad = next_pow2(n)
    if pad <= 512:
        return table["small"]
    if pad <= 1024:
        return table["large"]
    base = table["large"]  # wider rows: fewer rows a tile, so a tile stays within ~8K (4K backward) fp32 values
    return replace(
        base,
        fwd_rows=max(1, min(base.fwd_rows, 8192 // pad)),
        fwd_occ=1,
        fwd_blocks_per_sm=0,
        fwd_latency=0,
        bwd_rows=max(1, min(base.bwd_rows, 4096 // pad)),
        bwd_occ=1,
        bwd_latency=0,
    )


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def adl_fwd_kernel_body(
    X,
    BR,
    BB,
    W,
    B,
    RNG,
    XO,
    Y,
    STATS,
    eps,
    keep_scale,
    drop_threshold,
    C: ConstInt,
    K: ConstInt,
    PAD_LAST: ConstBool,
    TILE_ROWS: ConstInt,
    HAS_X: ConstBool,
    HAS_BB: ConstBool,
    HAS_W: ConstBool,
    HAS_B: ConstBool,
    DROPOUT: ConstBool,
    LATENCY: ConstInt,
):
    """Grid (G,) over the cdiv(M, TILE_ROWS) row tiles (persistent when G is smaller). X, BR, XO, Y (M, N), N
    covered by K chunks of C columns; BB, W, B (N,); STATS (2, M) fp32. x_out = x + dropout(br + bb), rounded
    to XO's dtype, and the LayerNorm of that rounded x_out into Y."""
    n = BR.shape[1]
    if DROPOUT:
        k0, k1 = call_keys(RNG)
        threshold = ct.astype(drop_threshold, ct.uint32)
    for r in range(ct.bid(0), ct.cdiv(BR.shape[0], TILE_ROWS), ct.num_blocks(0)):
        if DROPOUT:
            row_hash = row_hashes(r * TILE_ROWS, TILE_ROWS, k0, k1)[:, None]  # [TILE_ROWS, 1]
        xs = ()
        total = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)
        for k in ct.static_iter(range(K)):
            v = load_f32(BR, (r, k), (TILE_ROWS, C), LATENCY)  # [TILE_ROWS, C]
            if HAS_BB:
                v = v + ct.load(BB, (k,), (C,), padding_mode=ZERO).astype(ct.float32)[None, :]
            if DROPOUT:
                kept = keep(row_hash, col_hashes(k * C, C, k0, k1)[None, :], threshold)
                v = ct.where(kept, v * keep_scale, 0.0)
            if HAS_X:
                v = load_f32(X, (r, k), (TILE_ROWS, C), LATENCY) + v
            v = v.astype(XO.dtype)
            ct.store(XO, (r, k), v)
            v = v.astype(ct.float32)
            xs += (v,)
            total = total + ct.sum(v, axis=1, keepdims=True)
        normalize_and_store(xs, total, n, eps, r, W, B, Y, STATS, C, K, PAD_LAST, TILE_ROWS, HAS_W, HAS_B)


def adl_bwd_kernel_body(
    XO,
    W,
    STATS,
    RNG,
    DY,
    DXO,
    DX,
    DBR,
    PARTS,
    keep_scale,
    drop_threshold,
    N_PAD: ConstInt,
    TILE_ROWS: ConstInt,
    HAS_W: ConstBool,
    HAS_DXO: ConstBool,
    HAS_X: ConstBool,
    DROPOUT: ConstBool,
    LATENCY: ConstInt,
):
    """Persistent grid (G,). dres = dxo + LayerNorm backward of dy, into DX; dbranch = dropout's mask and scale on
    dres, into DBR; PARTS (3, G, N) fp32: this block's column sums of dy * xhat, dy and dbranch.

    LayerNorm backward: rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the N true columns.
    Padded rows have x = dy = mean = rstd = 0, so they add nothing to a sum; padded columns have dy = 0, and
    whatever else lands there is never stored."""
    n = XO.shape[1]
    g = ct.bid(0)
    if HAS_W:
        w = ct.load(W, (0,), (N_PAD,), padding_mode=ZERO).astype(ct.float32)[None, :]  # [1, N_PAD]
    if DROPOUT:
        k0, k1 = call_keys(RNG)
        threshold = ct.astype(drop_threshold, ct.uint32)
        col_hash = col_hashes(0, N_PAD, k0, k1)[None, :]  # [1, N_PAD]
    dw = ct.zeros((1, N_PAD), dtype=ct.float32)
    db = ct.zeros((1, N_PAD), dtype=ct.float32)
    dbb = ct.zeros((1, N_PAD), dtype=ct.float32)
    for t in range(g, ct.cdiv(XO.shape[0], TILE_ROWS), ct.num_blocks(0)):
        mean = ct.load(STATS, (0, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        rstd = ct.load(STATS, (1, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        xhat = (load_f32(XO, (t, 0), (TILE_ROWS, N_PAD), LATENCY) - mean) * rstd  # [TILE_ROWS, N_PAD]
        dy = load_f32(DY, (t, 0), (TILE_ROWS, N_PAD), LATENCY)
        wdy = dy * w if HAS_W else dy
        c1 = ct.sum(xhat * wdy, axis=1, keepdims=True) / n  # [TILE_ROWS, 1]
        c2 = ct.sum(wdy, axis=1, keepdims=True) / n
        dres = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DXO:
            dres = dres + load_f32(DXO, (t, 0), (TILE_ROWS, N_PAD), LATENCY)
        if HAS_X:
            ct.store(DX, (t, 0), dres.astype(DX.dtype))
        if DROPOUT:
            kept = keep(row_hashes(t * TILE_ROWS, TILE_ROWS, k0, k1)[:, None], col_hash, threshold)
            dres = ct.where(kept, dres * keep_scale, 0.0)
        ct.store(DBR, (t, 0), dres.astype(DBR.dtype))
        dw = dw + ct.sum(dy * xhat, axis=0, keepdims=True)
        db = db + ct.sum(dy, axis=0, keepdims=True)
        dbb = dbb + ct.sum(dres, axis=0, keepdims=True)
    ct.store(PARTS, (0, g, 0), dw.reshape((1, 1, N_PAD)))
    ct.store(PARTS, (1, g, 0), db.reshape((1, 1, N_PAD)))
    ct.store(PARTS, (2, g, 0), dbb.reshape((1, 1, N_PAD)))


@cache
def fwd_kernel(occupancy: int):
    return ct.kernel(adl_fwd_kernel_body, occupancy=occupancy)


@cache
def bwd_kernel(occupancy: int):
    return ct.kernel(adl_bwd_kernel_body, occupancy=occupancy)


# --------------------------------------------------------------------------------------------------
# Launch specs. An absent tensor gets the statistics array in its place, which its constant flag keeps unread.
# --------------------------------------------------------------------------------------------------
def _dropout_args(p: float) -> dict:
    return dict(keep_scale=1.0 / (1.0 - p), drop_threshold=dropout_threshold(p), DROPOUT=p > 0)


def fwd_spec(x, branch, branch_bias, weight, bias, rng, x_out, y, stats, *, eps, p, tiles, sm_count) -> LaunchSpec:
    """x (M, N) or None; branch, x_out, y (M, N); branch_bias, weight, bias (N,) or None; stats (2, M) fp32."""
    m, n = branch.shape
    c, k, pad_last = fwd_chunks(n, tiles.fwd_chunk)
    blocks = cdiv(m, tiles.fwd_rows)
    if tiles.fwd_blocks_per_sm:
        blocks = min(blocks, sm_count * tiles.fwd_blocks_per_sm)
    args = dict(
        X=stats if x is None else x,
        BR=branch,
        BB=stats if branch_bias is None else branch_bias,
        W=stats if weight is None else weight,
        B=stats if bias is None else bias,
        RNG=rng if p > 0 else stats,
        XO=x_out,
        Y=y,
        STATS=stats,
        eps=eps,
        **_dropout_args(p),
        C=c,
        K=k,
        PAD_LAST=pad_last,
        TILE_ROWS=tiles.fwd_rows,
        HAS_X=x is not None,
        HAS_BB=branch_bias is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        LATENCY=tiles.fwd_latency,
    )
    return LaunchSpec(adl_fwd_kernel_body, fwd_kernel(tiles.fwd_occ), (blocks, 1, 1), args)


def bwd_blocks(m: int, tiles: ADLTiles, sm_count: int) -> int:
    return max(1, min(cdiv(m, tiles.bwd_rows), sm_count * tiles.bwd_blocks_per_sm))


def bwd_spec(x_out, weight, stats, rng, dy, dx_out, dx, dbranch, parts, *, p, tiles) -> LaunchSpec:
    """dx_out (M, N) or None; dx (M, N) or None (no residual input); parts (3, G, N) fp32, G = bwd_blocks."""
    args = dict(
        XO=x_out,
        W=stats if weight is None else weight,
        STATS=stats,
        RNG=rng if p > 0 else stats,
        DY=dy,
        DXO=stats if dx_out is None else dx_out,
        DX=stats if dx is None else dx,
        DBR=dbranch,
        PARTS=parts,
        **_dropout_args(p),
        N_PAD=next_pow2(x_out.shape[1]),
        TILE_ROWS=tiles.bwd_rows,
        HAS_W=weight is not None,
        HAS_DXO=dx_out is not None,
        HAS_X=dx is not None,
        LATENCY=tiles.bwd_latency,
    )
    return LaunchSpec(adl_bwd_kernel_body, bwd_kernel(tiles.bwd_occ), (parts.shape[1], 1, 1), args)


# --------------------------------------------------------------------------------------------------
# Launch helpers on (M, N) rows
# --------------------------------------------------------------------------------------------------
@cache
def _table_tiles(device_index: int, n: int) -> ADLTiles:
    return tiles_for(arch_of(device_index), n)


def fwd_outputs(branch2, residual_dtype: torch.dtype, out_dtype: torch.dtype):
    """The forward's empty x_out (M, N) in the residual's dtype, y (M, N) in out_dtype, stats (2, M) fp32."""
    m, n = branch2.shape
    x_out = torch.empty(m, n, device=branch2.device, dtype=residual_dtype)
    y = torch.empty(m, n, device=branch2.device, dtype=out_dtype)
    return x_out, y, torch.empty(2, m, device=branch2.device, dtype=torch.float32)


def forward_rows(x2, branch2, branch_bias, weight, bias, rng, *, p, eps, out_dtype, tiles=None):
    """Launch the forward on (M, N) rows. Returns x_out, y, stats."""
    dev = branch2.get_device()
    tiles = tiles or _table_tiles(dev, branch2.shape[1])
    residual_dtype = branch2.dtype if x2 is None else x2.dtype
    x_out, y, stats = fwd_outputs(branch2, residual_dtype, out_dtype)
    spec = fwd_spec(
        x2, branch2, branch_bias, weight, bias, rng, x_out, y, stats, eps=eps, p=p, tiles=tiles, sm_count=sm_count(dev)
    )
    launch(spec, dev)
    return x_out, y, stats


def backward_rows(x_out, weight, stats, rng, dy2, dx_out2, *, p, has_x, branch_dtype, tiles=None):
    """Launch the backward and the column sums on (M, N) rows. Returns dx (None without a residual input),
    dbranch, and sums (3, N) fp32: the gradients of the LayerNorm weight and bias and of the branch bias."""
    m, n = x_out.shape
    dev = x_out.get_device()
    tiles = tiles or _table_tiles(dev, n)
    dx = torch.empty_like(x_out) if has_x else None
    dbranch = torch.empty(m, n, device=x_out.device, dtype=branch_dtype)
    parts = torch.empty(PARTIAL_SUMS, bwd_blocks(m, tiles, sm_count(dev)), n, device=x_out.device, dtype=torch.float32)
    launch(bwd_spec(x_out, weight, stats, rng, dy2, dx_out2, dx, dbranch, parts, p=p, tiles=tiles), dev)
    return dx, dbranch, column_sums(parts, dev)


# --------------------------------------------------------------------------------------------------
# The custom operators (opaque to torch.compile, with fake shapes and the backward registered) and the eager path
# --------------------------------------------------------------------------------------------------
def _rows_or_none(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else as_rows(t, n)


def _forward(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype):
    """The forward on tensors of any leading shape: x_out and y shaped like branch, and the stats."""
    n = branch.shape[-1]
    x_out, y, stats = forward_rows(
        _rows_or_none(x, n), as_rows(branch, n), branch_bias, weight, bias, rng, p=p, eps=eps, out_dtype=out_dtype
    )
    return x_out.view(branch.shape), y.view(branch.shape), stats


def _backward(x_out, weight, stats, rng, dy, dx_out, p, has_x, branch_dtype):
    """The backward on tensors of any leading shape: dx (None without a residual input) and dbranch shaped like
    x_out, and the (3, N) column sums."""
    n = x_out.shape[-1]
    dx, dbranch, sums = backward_rows(
        as_rows(x_out, n), weight, stats, rng, as_rows(dy, n), _rows_or_none(dx_out, n), p=p, has_x=has_x,
        branch_dtype=branch_dtype,
    )  # fmt: skip
    return None if dx is None else dx.view(x_out.shape), dbranch.view(x_out.shape), sums


@torch.library.custom_op("gptcore::add_dropout_layer_norm_fwd", mutates_args=(), device_types="cuda")
def adl_fwd_op(
    x: torch.Tensor | None,
    branch: torch.Tensor,
    branch_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    rng: torch.Tensor | None,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype)


@adl_fwd_op.register_fake
def _(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype):
    x_out, y, stats = fwd_outputs(branch.reshape(-1, branch.shape[-1]), (branch if x is None else x).dtype, out_dtype)
    return x_out.view(branch.shape), y.view(branch.shape), stats


@torch.library.custom_op("gptcore::add_dropout_layer_norm_bwd", mutates_args=(), device_types="cuda")
def adl_bwd_op(
    x_out: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    rng: torch.Tensor | None,
    dy: torch.Tensor,
    dx_out: torch.Tensor | None,
    p: float,
    has_x: bool,
    branch_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (empty without a residual input), dbranch, and the (3, N) fp32 column sums."""
    dx, dbranch, sums = _backward(x_out, weight, stats, rng, dy, dx_out, p, has_x, branch_dtype)
    return x_out.new_empty(0) if dx is None else dx, dbranch, sums


@adl_bwd_op.register_fake
def _(x_out, weight, stats, rng, dy, dx_out, p, has_x, branch_dtype):
    n = x_out.shape[-1]
    dx = torch.empty_like(x_out, memory_format=torch.contiguous_format) if has_x else x_out.new_empty(0)
    dbranch = torch.empty(x_out.shape, device=x_out.device, dtype=branch_dtype)
    return dx, dbranch, x_out.new_empty(PARTIAL_SUMS, n, dtype=torch.float32)


def _input_grads(sums, dx, dbranch, branch_bias, weight, bias):
    """The gradients of (x, branch, branch_bias, weight, bias) from the backward's outputs, each in its input's
    dtype; None for an absent input."""

    def grad(row, param):
        return None if param is None else sums[row].to(param.dtype)

    return dx, dbranch, grad(2, branch_bias), grad(0, weight), grad(1, bias)


def _setup_context(ctx, inputs, output):
    x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype = inputs
    x_out, _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x_out, weight, stats, rng, branch_bias, bias)
    ctx.p, ctx.has_x, ctx.branch_dtype = p, x is not None, branch.dtype


def _op_backward(ctx, dx_out, dy, _dstats):
    x_out, weight, stats, rng, branch_bias, bias = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x_out)
    dx, dbranch, sums = adl_bwd_op(x_out, weight, stats, rng, dy, dx_out, ctx.p, ctx.has_x, ctx.branch_dtype)
    dx = dx if ctx.has_x else None
    return (*_input_grads(sums, dx, dbranch, branch_bias, weight, bias), None, None, None, None)


adl_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerADL(torch.autograd.Function):
    """The eager path: autograd calls the launch helpers directly, without the custom operators' dispatch, and
    the residual's gradient stays None where x_out feeds nothing else (no zeros materialised)."""

    @staticmethod
    def forward(ctx, x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype):
        ctx.set_materialize_grads(False)
        x_out, y, stats = _forward(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype)
        ctx.save_for_backward(x_out, weight, stats, rng, branch_bias, bias)
        ctx.p, ctx.has_x, ctx.branch_dtype = p, x is not None, branch.dtype
        return x_out, y

    @staticmethod
    def backward(ctx, dx_out, dy):
        x_out, weight, stats, rng, branch_bias, bias = ctx.saved_tensors
        dy = torch.zeros_like(x_out) if dy is None else dy
        dx, dbranch, sums = _backward(x_out, weight, stats, rng, dy, dx_out, ctx.p, ctx.has_x, ctx.branch_dtype)
        return (*_input_grads(sums, dx, dbranch, branch_bias, weight, bias), None, None, None, None)


def _check(x, branch, branch_bias, weight, bias, p):
    n = branch.shape[-1]
    if branch.dtype not in LAYER_NORM_DTYPES:
        raise TypeError(f"add_dropout_layer_norm: branch dtype {branch.dtype} not in {LAYER_NORM_DTYPES}")
    if branch.numel() == 0:
        raise ValueError("add_dropout_layer_norm got an empty branch")
    if x is not None:
        if x.shape != branch.shape:
            raise ValueError(f"add_dropout_layer_norm: x {tuple(x.shape)} and branch {tuple(branch.shape)} differ")
        if x.dtype not in LAYER_NORM_DTYPES:
            raise TypeError(f"add_dropout_layer_norm: x dtype {x.dtype} not in {LAYER_NORM_DTYPES}")
    for name, t in (("branch_bias", branch_bias), ("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (n,) or t.dtype not in LAYER_NORM_DTYPES):
            raise ValueError(
                f"add_dropout_layer_norm: {name} must be ({n},) in {LAYER_NORM_DTYPES}, got {tuple(t.shape)} {t.dtype}"
            )
    for name, t in (("x", x), ("branch", branch), ("branch_bias", branch_bias), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_cuda:
            raise RuntimeError(f"add_dropout_layer_norm needs CUDA tensors ({name} is on {t.device})")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"add_dropout_layer_norm: dropout p must be in [0, 1), got {p}")


def add_dropout_layer_norm(
    x: torch.Tensor | None,
    branch: torch.Tensor,
    branch_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    p: float = 0.0,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_out = x + dropout(branch + branch_bias, p) and y = F.layer_norm(x_out, weight, bias, eps) in out_dtype
    (default: branch's dtype), on cuTile kernels; differentiable in every tensor. x None: x_out = the dropout
    alone; x_out is in x's dtype (branch's without x). Dropout draws its keys `rng` from the default CUDA
    generator unless given (gptcore.kernels.dropout)."""
    _check(x, branch, branch_bias, weight, bias, p)
    out_dtype = out_dtype or branch.dtype
    contiguous = [None if t is None else t.contiguous() for t in (branch_bias, weight, bias)]
    branch_bias, weight, bias = contiguous
    if p > 0 and rng is None:
        rng = dropout_rng(branch.device)
    p, eps = float(p), float(eps)
    if not launches_directly(x, branch, branch_bias, weight, bias):
        x_out, y, _ = adl_fwd_op(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype)
        return x_out, y
    tensors = (x, branch, branch_bias, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _EagerADL.apply(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype)
    return _forward(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype)[:2]
