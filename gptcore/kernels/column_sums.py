"""The second half of a deterministic column sum: per-block partial sums, added up in a fixed order.

The fused backward kernels (residual_layernorm.py, bias_gelu.py) run on a persistent grid and each block writes
its partial column sums of the gradients it produced (the bias and LayerNorm parameter gradients) as one row of
PARTS (R, G, N) fp32: R sums, G blocks, N columns. This kernel adds the G rows of each sum: no atomics, so the
same inputs give the same bits on every run.
"""

from __future__ import annotations

from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.spec import ConstInt, LaunchSpec, cdiv, launch

ZERO = ct.PaddingMode.ZERO

TILE_G = 128  # partial rows per step: a persistent grid has one to a few blocks per SM
TILE_N = 32  # columns per block


def colsum_kernel_body(PARTS, SUMS, TILE_G: ConstInt, TILE_N: ConstInt):
    """Grid (cdiv(N, TILE_N), R). SUMS (R, N) fp32: row r the sum over G of PARTS[r]. Padded rows load as 0."""
    c, r = ct.bid(0), ct.bid(1)
    acc = ct.zeros((TILE_G, TILE_N), dtype=ct.float32)
    for t in range(ct.cdiv(PARTS.shape[1], TILE_G)):
        acc = acc + ct.load(PARTS, (r, t, c), (1, TILE_G, TILE_N), padding_mode=ZERO).reshape((TILE_G, TILE_N))
    ct.store(SUMS, (r, c), ct.sum(acc, axis=0).reshape((1, TILE_N)))


@cache
def colsum_kernel():
    return ct.kernel(colsum_kernel_body)


def colsum_spec(parts: torch.Tensor, sums: torch.Tensor) -> LaunchSpec:
    """parts (R, G, N) fp32 -> sums (R, N) fp32."""
    args = dict(PARTS=parts, SUMS=sums, TILE_G=TILE_G, TILE_N=TILE_N)
    grid = (cdiv(parts.shape[2], TILE_N), parts.shape[0], 1)
    return LaunchSpec(colsum_kernel_body, colsum_kernel(), grid, args)


def column_sums(parts: torch.Tensor, device_index: int) -> torch.Tensor:
    """The (R, N) fp32 sums of the (R, G, N) partials."""
    sums = torch.empty(parts.shape[0], parts.shape[2], device=parts.device, dtype=torch.float32)
    launch(colsum_spec(parts, sums), device_index)
    return sums
