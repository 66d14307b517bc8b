"""The MLP's first epilogue in cuTile: g = GELU(u + b), exact (erf) GELU as GPT-2 in nanoGPT, forward and
backward, where u is c_fc's matmul output without its bias.

The forward reads u once and writes g in u's dtype: the bias add and the activation in one pass. The backward
reads u and dg, writes du = dg * GELU'(u + b), and sums du over the rows for the bias gradient on the way (each
block of a persistent grid keeps its partial column sums; gptcore.kernels.column_sums adds them up in a fixed
order), so neither the bias add nor its gradient's reduction is a kernel of its own.

cuTile has no erf, so the normal CDF comes from erfc by the Chebyshev-fitted formula of Numerical Recipes
(section 6.2, `erfcc`), fractional error under 1.2e-7 for every argument: fp32 rounding's size, far under the
bf16 output's. Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 and erfc(-x / sqrt 2) / 2 below, so both tails keep
their relative accuracy; GELU(x) = x Phi(x), GELU'(x) = Phi(x) + x phi(x). `erfc_nonneg_reference` is the
same formula in PyTorch (tests check it against torch.erfc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.column_sums import column_sums
from gptcore.kernels.layernorm import as_rows, load_f32
from gptcore.kernels.runtime import arch_of, launches_directly, sm_count
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch

ZERO = ct.PaddingMode.ZERO
SQRT1_2 = 1 / math.sqrt(2)
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
GELU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z / 2): P's coefficients, constant term first.
ERFC_COEFFS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


@dataclass(frozen=True)
class GeluTiles:
    fwd_rows: int  # rows of a forward tile
    fwd_cols: int  # columns of a forward tile
    fwd_occ: int
    bwd_rows: int
    bwd_cols: int
    bwd_occ: int
    bwd_blocks_per_sm: int  # the backward's persistent grid, over column tiles x row groups


# sm_90: the fastest of the sweeps on an H100 at both presets' MLP widths (results/h100/tune-fused.json).
GELU_TILES = {
    "sm_90": GeluTiles(fwd_rows=16, fwd_cols=256, fwd_occ=4, bwd_rows=64, bwd_cols=64, bwd_occ=4, bwd_blocks_per_sm=4),
    "default": GeluTiles(
        fwd_rows=64, fwd_cols=128, fwd_occ=2, bwd_rows=64, bwd_cols=128, bwd_occ=2, bwd_blocks_per_sm=4
    ),
}


def tiles_for(arch: str, width: int | None = None) -> GeluTiles:
    """The architecture's tiles (one entry for every width)."""
    return GELU_TILES.get(arch, GELU_TILES["default"])


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _erfc_nonneg(z):
    """erfc(z) for z >= 0 (Numerical Recipes' erfcc), fp32 tile."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = ct.full(z.shape, ERFC_COEFFS[-1], dtype=ct.float32)
    for c in ct.static_iter(ERFC_COEFFS[-2::-1]):
        poly = poly * t + c
    return t * ct.exp(poly - z * z)


def _phi_cdf(x):
    """The standard normal CDF Phi(x), each tail from its own erfc (see the module's docstring)."""
    half_tail = 0.5 * _erfc_nonneg(ct.abs(x) * SQRT1_2)
    return ct.where(x >= 0.0, 1.0 - half_tail, half_tail)


def _biased(U, BB, r, c, TILE_ROWS, TILE_COLS, HAS_BB, LATENCY):
    x = load_f32(U, (r, c), (TILE_ROWS, TILE_COLS), LATENCY)  # [TILE_ROWS, TILE_COLS]
    if HAS_BB:
        x = x + ct.load(BB, (c,), (TILE_COLS,), padding_mode=ZERO).astype(ct.float32)[None, :]
    return x


def gelu_fwd_kernel_body(U, BB, G, TILE_ROWS: ConstInt, TILE_COLS: ConstInt, HAS_BB: ConstBool):
    """Grid (cdiv(M, TILE_ROWS), cdiv(F, TILE_COLS)). U, G (M, F); BB (F,). G = GELU(U + BB) in G's dtype."""
    r, c = ct.bid(0), ct.bid(1)
    x = _biased(U, BB, r, c, TILE_ROWS, TILE_COLS, HAS_BB, 0)
    ct.store(G, (r, c), (x * _phi_cdf(x)).astype(G.dtype))


def gelu_bwd_kernel_body(U, BB, DG, DU, PARTS, TILE_ROWS: ConstInt, TILE_COLS: ConstInt, HAS_BB: ConstBool):
    """Grid (cdiv(F, TILE_COLS), G): block (c, g) takes column tile c of the row tiles g, g + G, ... DU (M, F) =
    DG * GELU'(U + BB); PARTS (1, G, F) fp32: this block's column sums of DU. Padded rows have DG = 0."""
    c, g = ct.bid(0), ct.bid(1)
    acc = ct.zeros((1, TILE_COLS), dtype=ct.float32)
    for t in range(g, ct.cdiv(U.shape[0], TILE_ROWS), ct.num_blocks(1)):
        x = _biased(U, BB, t, c, TILE_ROWS, TILE_COLS, HAS_BB, 0)
        dg = load_f32(DG, (t, c), (TILE_ROWS, TILE_COLS), 0)
        du = dg * (_phi_cdf(x) + x * ct.exp(-0.5 * x * x) * INV_SQRT_2PI)
        ct.store(DU, (t, c), du.astype(DU.dtype))
        acc = acc + ct.sum(du, axis=0, keepdims=True)
    ct.store(PARTS, (0, g, c), acc.reshape((1, 1, TILE_COLS)))


@cache
def fwd_kernel(occupancy: int):
    return ct.kernel(gelu_fwd_kernel_body, occupancy=occupancy)


@cache
def bwd_kernel(occupancy: int):
    return ct.kernel(gelu_bwd_kernel_body, occupancy=occupancy)


# --------------------------------------------------------------------------------------------------
# Launch specs and helpers on (M, F) rows; an absent bias gets U in its place, unread (HAS_BB False).
# --------------------------------------------------------------------------------------------------
def fwd_spec(u, bias, g, *, tiles: GeluTiles) -> LaunchSpec:
    m, f = u.shape
    args = dict(U=u, BB=u if bias is None else bias, G=g, TILE_ROWS=tiles.fwd_rows, TILE_COLS=tiles.fwd_cols)
    args["HAS_BB"] = bias is not None
    grid = (cdiv(m, tiles.fwd_rows), cdiv(f, tiles.fwd_cols), 1)
    return LaunchSpec(gelu_fwd_kernel_body, fwd_kernel(tiles.fwd_occ), grid, args)


def bwd_groups(m: int, f: int, tiles: GeluTiles, sm_count: int) -> int:
    """Row groups G of the backward's grid: about bwd_blocks_per_sm blocks per SM over the column tiles."""
    return max(1, min(cdiv(m, tiles.bwd_rows), sm_count * tiles.bwd_blocks_per_sm // cdiv(f, tiles.bwd_cols)))


def bwd_spec(u, bias, dg, du, parts, *, tiles: GeluTiles) -> LaunchSpec:
    """parts (1, G, F) fp32, G = bwd_groups."""
    args = dict(U=u, BB=u if bias is None else bias, DG=dg, DU=du, PARTS=parts)
    args.update(TILE_ROWS=tiles.bwd_rows, TILE_COLS=tiles.bwd_cols, HAS_BB=bias is not None)
    grid = (cdiv(u.shape[1], tiles.bwd_cols), parts.shape[1], 1)
    return LaunchSpec(gelu_bwd_kernel_body, bwd_kernel(tiles.bwd_occ), grid, args)


@cache
def _table_tiles(device_index: int) -> GeluTiles:
    return tiles_for(arch_of(device_index))


def forward_rows(u2, bias, tiles: GeluTiles | None = None) -> torch.Tensor:
    dev = u2.get_device()
    g = torch.empty_like(u2)
    launch(fwd_spec(u2, bias, g, tiles=tiles or _table_tiles(dev)), dev)
    return g


def backward_rows(u2, bias, dg2, tiles: GeluTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """du (M, F) in u's dtype and the bias gradient (F,) fp32 (the column sums of du)."""
    dev = u2.get_device()
    tiles = tiles or _table_tiles(dev)
    m, f = u2.shape
    du = torch.empty_like(u2)
    parts = torch.empty(1, bwd_groups(m, f, tiles, sm_count(dev)), f, device=u2.device, dtype=torch.float32)
    launch(bwd_spec(u2, bias, dg2, du, parts, tiles=tiles), dev)
    return du, column_sums(parts, dev)[0]


# --------------------------------------------------------------------------------------------------
# The custom operators and the eager path
# --------------------------------------------------------------------------------------------------
def _forward(u, bias):
    """The forward on u of any leading shape."""
    return forward_rows(as_rows(u, u.shape[-1]), bias).view(u.shape)


def _backward(u, bias, dg):
    """du shaped like u, and the bias gradient (F,) fp32."""
    f = u.shape[-1]
    du, dbias = backward_rows(as_rows(u, f), bias, as_rows(dg, f))
    return du.view(u.shape), dbias


@torch.library.custom_op("gptcore::bias_gelu_fwd", mutates_args=(), device_types="cuda")
def bias_gelu_fwd_op(u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _forward(u, bias)


@bias_gelu_fwd_op.register_fake
def _(u, bias):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("gptcore::bias_gelu_bwd", mutates_args=(), device_types="cuda")
def bias_gelu_bwd_op(u: torch.Tensor, bias: torch.Tensor | None, dg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """du, and the bias gradient (F,) fp32."""
    return _backward(u, bias, dg)


@bias_gelu_bwd_op.register_fake
def _(u, bias, dg):
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(u.shape[-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    u, bias = inputs
    ctx.save_for_backward(u, bias)


def _op_backward(ctx, dg):
    u, bias = ctx.saved_tensors
    du, dbias = bias_gelu_bwd_op(u, bias, dg)
    return du, None if bias is None else dbias.to(bias.dtype)


bias_gelu_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The eager path: the launch helpers without the custom operators' dispatch."""

    @staticmethod
    def forward(ctx, u, bias):
        ctx.save_for_backward(u, bias)
        return _forward(u, bias)

    @staticmethod
    def backward(ctx, dg):
        u, bias = ctx.saved_tensors
        du, dbias = _backward(u, bias, dg)
        return du, None if bias is None else dbias.to(bias.dtype)


def _check(u, bias):
    if u.dtype not in GELU_DTYPES:
        raise TypeError(f"bias_gelu: u dtype {u.dtype} not in {GELU_DTYPES}")
    if bias is not None and (bias.shape != (u.shape[-1],) or bias.dtype not in GELU_DTYPES):
        raise ValueError(f"bias_gelu: bias must be ({u.shape[-1]},) in {GELU_DTYPES}, got {tuple(bias.shape)}")
    if not u.is_cuda or (bias is not None and not bias.is_cuda):
        raise RuntimeError("bias_gelu needs CUDA tensors")
    if u.numel() == 0:
        raise ValueError("bias_gelu got an empty tensor")


def bias_gelu(u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.gelu(u + bias) (exact, erf) in u's dtype on cuTile kernels; differentiable in u and bias."""
    _check(u, bias)
    bias = None if bias is None else bias.contiguous()
    if not launches_directly(u, bias):
        return bias_gelu_fwd_op(u, bias)
    if torch.is_grad_enabled() and (u.requires_grad or (bias is not None and bias.requires_grad)):
        return _EagerBiasGelu.apply(u, bias)
    return _forward(u, bias)


def erfc_nonneg_reference(z: torch.Tensor) -> torch.Tensor:
    """The kernels' erfc for z >= 0 in PyTorch (in z's precision)."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = torch.full_like(z, ERFC_COEFFS[-1])
    for c in ERFC_COEFFS[-2::-1]:
        poly = poly * t + c
    return t * torch.exp(poly - z * z)
