"""Attention of one new token per row over the KV cache in cuTile (flash-decoding), with the cache append.

A decode step has one query per (row, head) and up to block_size cached keys. One block per (row, head) would
leave most SMs idle at batch 1, so the cache is split: block (bh, s) takes key tiles [s * per_split, (s + 1) *
per_split) and keeps its online-softmax state (running max m, sum l, unnormalised output); a second kernel
combines the splits of each (row, head) by their maxima. When (row, head) pairs alone fill the GPU, or the cache
is short, one split runs and the first kernel writes the output itself (one launch, no combine).

The kernel reads the new token's q, k and v from the packed c_attn output (B, 3C) and writes its k and v into the
cache at `pos` (every split writes the same values; none reads them back: the block whose tile holds `pos` takes
the new key and value from registers). Scores are fp32 from the half cache; keys past `pos` are masked with the
finite floor of the training kernels (MASK_FLOOR), and their values zeroed, so stale cache rows never reach the
output. Every split holds at least one key at or before `pos` (split_plan), so its maximum is a real score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.attention import LOG2E, padded_head_dim
from gptcore.kernels.layernorm import next_pow2
from gptcore.kernels.runtime import ATTENTION_DTYPES, arch_of, launches_directly, sm_count
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch
from gptcore.model import MASK_FLOOR

ZERO = ct.PaddingMode.ZERO


@dataclass(frozen=True)
class DecodeAttentionTiles:
    tile_n: int  # keys per tile
    min_tiles_per_split: int  # a split takes at least this many key tiles (a combine launch must pay)
    blocks_per_sm: int  # split until (row, head) pairs x splits reach this many blocks per SM
    occupancy: int


DECODE_ATTENTION_TILES = {
    "default": DecodeAttentionTiles(tile_n=64, min_tiles_per_split=4, blocks_per_sm=1, occupancy=4),
}


def tiles_for(arch: str) -> DecodeAttentionTiles:
    return DECODE_ATTENTION_TILES.get(arch, DECODE_ATTENTION_TILES["default"])


def split_plan(pos: int, pairs: int, tiles: DecodeAttentionTiles, sms: int) -> tuple[int, int]:
    """(splits, key tiles per split) for a query at `pos` (keys 0..pos) and `pairs` (row, head) pairs: every split
    starts at or before `pos`."""
    n_tiles = cdiv(pos + 1, tiles.tile_n)
    wanted = max(1, cdiv(sms * tiles.blocks_per_sm, pairs))
    splits = max(1, min(wanted, n_tiles // tiles.min_tiles_per_split))
    per_split = cdiv(n_tiles, splits)
    return cdiv(n_tiles, per_split), per_split


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _cache_tile(C, b, h, j, keys, pos, new, D, TILE_N):
    """Key or value tile j (TILE_N, D) fp32: the cache's rows before pos, the new row at pos, zeros after."""
    x = ct.load(C, (b, h, j, 0), (1, 1, TILE_N, D), padding_mode=ZERO, latency=2).reshape((TILE_N, D))
    x = ct.where(keys == pos, new, x.astype(ct.float32))
    return ct.where(keys <= pos, x, 0.0)


def decode_attention_kernel_body(
    QKV,
    KC,
    VC,
    O,
    PART_O,
    PART_ML,
    pos: int,
    per_split: int,
    qk_scale_log2: float,
    N_HEAD: ConstInt,
    D: ConstInt,
    TILE_N: ConstInt,
    SPLIT: ConstBool,
):
    """Grid (B * H, splits). QKV (B, 3, H, hd); KC, VC (B, H, L, hd); O (B, H, hd). With SPLIT, PART_O (B * H,
    splits, hd) fp32 gets the unnormalised outputs and PART_ML (2, B * H, splits) fp32 the maxima (raw score units)
    and sums; without, O gets the output (and PART_O, PART_ML are unread)."""
    bh, s = ct.bid(0), ct.bid(1)
    b, h = bh // N_HEAD, bh % N_HEAD
    q = ct.load(QKV, (b, 0, h, 0), (1, 1, 1, D), padding_mode=ZERO).reshape((1, D)).astype(ct.float32)
    k_new = ct.load(QKV, (b, 1, h, 0), (1, 1, 1, D), padding_mode=ZERO)
    v_new = ct.load(QKV, (b, 2, h, 0), (1, 1, 1, D), padding_mode=ZERO)
    ct.store(KC, (b, h, pos, 0), k_new.astype(KC.dtype))
    ct.store(VC, (b, h, pos, 0), v_new.astype(VC.dtype))
    k_new = k_new.reshape((1, D)).astype(ct.float32)
    v_new = v_new.reshape((1, D)).astype(ct.float32)
    m = ct.full((1, 1), MASK_FLOOR, dtype=ct.float32)
    l = ct.zeros((1, 1), dtype=ct.float32)
    acc = ct.zeros((1, D), dtype=ct.float32)
    first = s * per_split
    for j in range(first, first + per_split):
        keys = j * TILE_N + ct.arange(TILE_N, dtype=ct.int32)[:, None]  # [TILE_N, 1]
        k = _cache_tile(KC, b, h, j, keys, pos, k_new, D, TILE_N)
        scores = ct.where(keys <= pos, ct.sum(k * q, axis=1, keepdims=True), MASK_FLOOR)  # [TILE_N, 1]
        m_new = ct.maximum(m, ct.max(scores, axis=0, keepdims=True))
        p = ct.exp2((scores - m_new) * qk_scale_log2, flush_to_zero=True)
        alpha = ct.exp2((m - m_new) * qk_scale_log2, flush_to_zero=True)
        v = _cache_tile(VC, b, h, j, keys, pos, v_new, D, TILE_N)
        l = l * alpha + ct.sum(p, axis=0, keepdims=True)
        acc = acc * alpha + ct.sum(p * v, axis=0, keepdims=True)
        m = m_new
    if SPLIT:
        ct.store(PART_O, (bh, s, 0), acc.reshape((1, 1, D)))
        ct.store(PART_ML, (0, bh, s), m.reshape((1, 1, 1)))
        ct.store(PART_ML, (1, bh, s), l.reshape((1, 1, 1)))
    else:
        ct.store(O, (b, h, 0), (acc / l).reshape((1, 1, D)).astype(O.dtype))


def decode_attention_combine_kernel_body(
    PART_O, PART_ML, O, qk_scale_log2: float, N_HEAD: ConstInt, D: ConstInt, SPLITS: ConstInt
):
    """Grid (B * H,). The splits of one (row, head), weighted by exp(their max - the overall max), into O."""
    bh = ct.bid(0)
    b, h = bh // N_HEAD, bh % N_HEAD
    real = ct.arange(SPLITS, dtype=ct.int32)[:, None] < PART_ML.shape[2]  # [SPLITS, 1]: SPLITS is padded
    m = ct.load(PART_ML, (0, bh, 0), (1, 1, SPLITS), padding_mode=ZERO).reshape((SPLITS, 1))
    m = ct.where(real, m, MASK_FLOOR)
    l = ct.load(PART_ML, (1, bh, 0), (1, 1, SPLITS), padding_mode=ZERO).reshape((SPLITS, 1))
    acc = ct.load(PART_O, (bh, 0, 0), (1, SPLITS, D), padding_mode=ZERO).reshape((SPLITS, D))
    weight = ct.where(real, ct.exp2((m - ct.max(m, axis=0, keepdims=True)) * qk_scale_log2, flush_to_zero=True), 0.0)
    out = ct.sum(weight * acc, axis=0, keepdims=True) / ct.sum(weight * l, axis=0, keepdims=True)
    ct.store(O, (b, h, 0), out.reshape((1, 1, D)).astype(O.dtype))


@cache
def kernel(occupancy: int):
    return ct.kernel(decode_attention_kernel_body, occupancy=occupancy)


@cache
def combine_kernel():
    return ct.kernel(decode_attention_combine_kernel_body)


# --------------------------------------------------------------------------------------------------
# Launch specs and the host call
# --------------------------------------------------------------------------------------------------
def heads_view(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """The packed (B, 3C) c_attn output as (B, 3, H, hd): a view."""
    b, c3 = qkv.shape
    return qkv.view(b, 3, n_head, c3 // (3 * n_head))


def outputs(
    qkv: torch.Tensor, n_head: int, splits: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """o (B, H, hd) in qkv's dtype, and with several splits their parts (B * H, splits, hd) and (2, B * H, splits),
    fp32 (None with one split: the kernel writes o itself)."""
    b, c3 = qkv.shape
    hd = c3 // (3 * n_head)
    o = qkv.new_empty((b, n_head, hd))
    if splits == 1:
        return o, None, None
    part_o = qkv.new_empty((b * n_head, splits, hd), dtype=torch.float32)
    part_ml = qkv.new_empty((2, b * n_head, splits), dtype=torch.float32)
    return o, part_o, part_ml


def spec(qkv4, k_cache, v_cache, o, part_o, part_ml, *, pos: int, per_split: int, tiles) -> LaunchSpec:
    """qkv4 (B, 3, H, hd) (heads_view); part_o's second dim is the number of splits; without parts (one split) o
    takes their places, unread."""
    b, _, n_head, hd = qkv4.shape
    splits = 1 if part_o is None else part_o.shape[1]
    args = dict(
        QKV=qkv4, KC=k_cache, VC=v_cache, O=o, PART_O=o if part_o is None else part_o,
        PART_ML=o if part_ml is None else part_ml, pos=pos, per_split=per_split,
        qk_scale_log2=LOG2E / math.sqrt(hd), N_HEAD=n_head, D=padded_head_dim(hd), TILE_N=tiles.tile_n,
        SPLIT=part_o is not None,
    )  # fmt: skip
    return LaunchSpec(decode_attention_kernel_body, kernel(tiles.occupancy), (b * n_head, splits, 1), args)


def combine_spec(part_o, part_ml, o) -> LaunchSpec:
    b, n_head, hd = o.shape
    splits = part_o.shape[1]
    args = dict(
        PART_O=part_o, PART_ML=part_ml, O=o, qk_scale_log2=LOG2E / math.sqrt(hd), N_HEAD=n_head,
        D=padded_head_dim(hd), SPLITS=next_pow2(splits),
    )  # fmt: skip
    return LaunchSpec(decode_attention_combine_kernel_body, combine_kernel(), (b * n_head, 1, 1), args)


@cache
def _table_tiles(device_index: int) -> DecodeAttentionTiles:
    return tiles_for(arch_of(device_index))


def _forward(qkv, k_cache, v_cache, pos: int, n_head: int, tiles=None) -> torch.Tensor:
    dev = qkv.get_device()
    tiles = tiles or _table_tiles(dev)
    splits, per_split = split_plan(pos, qkv.shape[0] * n_head, tiles, sm_count(dev))
    o, part_o, part_ml = outputs(qkv, n_head, splits)
    launch(spec(heads_view(qkv, n_head), k_cache, v_cache, o, part_o, part_ml, pos=pos, per_split=per_split,
                tiles=tiles), dev)  # fmt: skip
    if splits > 1:
        launch(combine_spec(part_o, part_ml, o), dev)
    return o.view(qkv.shape[0], -1)


@torch.library.custom_op("gptcore::decode_attention", mutates_args=("k_cache", "v_cache"), device_types="cuda")
def decode_attention_op(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_head: int
) -> torch.Tensor:
    return _forward(qkv, k_cache, v_cache, pos, n_head)


@decode_attention_op.register_fake
def _(qkv, k_cache, v_cache, pos, n_head):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))


def _check(qkv, k_cache, v_cache, pos: int, n_head: int):
    if qkv.dim() != 2 or qkv.shape[1] % (3 * n_head):
        raise ValueError(f"decode_attention: qkv must be (B, 3C) with C a multiple of n_head {n_head}, got "
                         f"{tuple(qkv.shape)}")  # fmt: skip
    b, hd = qkv.shape[0], qkv.shape[1] // (3 * n_head)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or tuple(c.shape[:2]) != (b, n_head) or c.shape[3] != hd or not c.is_contiguous():
            raise ValueError(f"decode_attention: {name} must be contiguous ({b}, {n_head}, L, {hd}), got "
                             f"{tuple(c.shape)}")  # fmt: skip
    if not 0 <= pos < k_cache.shape[2]:
        raise ValueError(f"decode_attention: pos {pos} is outside the cache's {k_cache.shape[2]} positions")
    if qkv.dtype not in ATTENTION_DTYPES or not qkv.is_contiguous():
        raise TypeError(f"decode_attention: qkv must be contiguous bfloat16 or float16, got {qkv.dtype}")
    if not (qkv.is_cuda and k_cache.is_cuda and v_cache.is_cuda):
        raise RuntimeError("decode_attention needs CUDA tensors")


def decode_attention(qkv, k_cache, v_cache, pos: int, n_head: int) -> torch.Tensor:
    """The new token's attention output (B, C) from its packed qkv (B, 3C) over the cached positions 0..pos-1 and
    itself; its k and v are written into the caches (B, H, L, hd) at `pos`. Causal by construction."""
    _check(qkv, k_cache, v_cache, pos, n_head)
    if launches_directly(qkv, k_cache, v_cache):
        return _forward(qkv, k_cache, v_cache, pos, n_head)
    return decode_attention_op(qkv, k_cache, v_cache, pos, n_head)
