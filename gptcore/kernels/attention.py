"""Causal flash attention in cuTile: forward with online softmax, backward for dQ, dK and dV.

Layout: q is (B, H, Tq, D), k and v are (B, H, Tk, D), Tq <= Tk. Any strides with a unit last stride
are used as they are (the model hands in transposed views of the c_attn output; copying them would
cost more than the attention forward), and the output is allocated (B, T, H, D)-major so the model's
`y.transpose(1, 2).contiguous()` is free. Query i sits at key position i + Tk - Tq (bottom-right
alignment), so Tq = 1 against a KV cache attends to the whole cache.

Numerics: scores accumulate in fp32; masked scores are set to a finite floor (MASK_FLOOR, never -inf),
so no row turns into NaN, also with score magnitudes of 1e4 in fp16.

The forward's softmax runs in base 2 on differences from the row max, p = exp2((s - max) * c) with
c = scale * log2(e), so the max entry gets exactly 1.0: the same 1.0 in the fp32 row sum and, cast, in
the bf16/fp16 P @ V product, and a saturated row's output is exactly its value row. (The one-FFMA form
s * c - max * c gives the max entry slightly more than 1, which the row sum keeps and fp16 P rounds away:
saturated rows then lose accuracy in their key gradients.) The backward needs no such consistency and
uses one FFMA per score (`_exp2_bias`).

The forward saves the log-sum-exp of each query row in two fp32 parts, STATS (2, B, H, Tq): the row max
m of the raw scores and log2 of the row sum l, so logsumexp(scale * s) = scale * m + ln(2) * log2(l)
(`logsumexp` below). A single fp32 number loses too much at scores of 1e4 for the backward, which
rebuilds every P from it.

Backward: two kernels. The dQ kernel first computes delta = rowsum(dO * O) for its query tile (the
usual preprocess, fused here: the tile of dO is loaded anyway) and stores it, then loops over key
tiles. The dK/dV kernel, launched after it, owns one key tile and loops over the query tiles that
can see it. No atomics; P is recomputed in both (7 matrix products instead of 5, each in-register).

Work order: query tiles near the end of the sequence see the most keys, so within a head the longest
tiles start first; the heads go one after another (HEAD_MAJOR) so the blocks resident at a time share
K/V in L2 (see _block_coords). Only the diagonal tiles apply a mask.

The measurements behind these choices are in results/h100/kernel-design.csv and
results/h100/tune-attention.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import cuda.tile as ct
import torch

from gptcore.kernels.dropout import dropout_rng, dropout_threshold
from gptcore.kernels.runtime import ATTENTION_DTYPES, arch_of, attention_head_dim_unsupported, launches_directly
from gptcore.kernels.spec import ConstBool, ConstInt, LaunchSpec, cdiv, launch
from gptcore.kernels.tile_random import call_keys, col_hashes, keep, row_hashes
from gptcore.model import MASK_FLOOR

ZERO = ct.PaddingMode.ZERO

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# Block order. HEAD_MAJOR: consecutive blocks work on the same (batch, head), its longest tiles first,
# so the blocks resident at once share K/V in L2. LONGEST_FIRST: the longest tiles of every head first
# (better load balance, but every head's K/V is in flight at once).
HEAD_MAJOR = 0
LONGEST_FIRST = 1


# --------------------------------------------------------------------------------------------------
# Tile configurations per architecture
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnTiles:
    """The launch configuration of the forward, dQ and dK/dV kernels (occ: the occupancy hint)."""

    fwd_m: int  # query rows per forward tile
    fwd_n: int  # key rows per step of the forward's loop
    fwd_occ: int
    dq_m: int  # query rows per dQ tile
    dq_n: int  # key rows per step of the dQ loop
    dq_occ: int
    dkv_m: int  # query rows per inner step of the dK/dV kernel
    dkv_n: int  # key rows owned by one dK/dV block
    dkv_occ: int
    fwd_sched: int = HEAD_MAJOR  # block order of the forward kernel
    fwd_sched_long: int = HEAD_MAJOR  # the forward's block order from Tq >= fwd_long_from on
    fwd_long_from: int = 2048
    bwd_sched: int = HEAD_MAJOR  # block order of both backward kernels

    def fwd_order(self, tq: int) -> int:
        """The forward's block order for Tq query rows."""
        return self.fwd_sched_long if tq >= self.fwd_long_from else self.fwd_sched


# sm_90: the winners of the tile sweeps (gptcore.bench.tune; results/h100/tune-attention.json), with the
# forward's own block order for long sequences. Other architectures: untuned, compile-checked.
ATTN_TILES = {
    "sm_90": AttnTiles(
        fwd_m=64,
        fwd_n=64,
        fwd_occ=4,
        dq_m=64,
        dq_n=64,
        dq_occ=2,
        dkv_m=128,
        dkv_n=64,
        dkv_occ=2,
        fwd_sched_long=LONGEST_FIRST,
    ),
    "default": AttnTiles(fwd_m=64, fwd_n=64, fwd_occ=4, dq_m=64, dq_n=64, dq_occ=2, dkv_m=128, dkv_n=64, dkv_occ=2),
}


def padded_head_dim(head_dim: int) -> int:
    """The kernels' head-dim tile: the next power of two (zero padding in the loads, dropped by the stores)."""
    return 1 << max(0, (head_dim - 1).bit_length())


def tiles_for(arch: str, head_dim: int = 64) -> AttnTiles:
    tiles = ATTN_TILES.get(arch, ATTN_TILES["default"])
    if padded_head_dim(head_dim) >= 128:
        # A [TILE_M, 128] fp32 accumulator plus the score tile no longer fits twice per SM with
        # 128-wide key tiles; halve the key tile so register pressure stays out of local memory.
        tiles = replace(
            tiles,
            fwd_n=min(tiles.fwd_n, 64),
            fwd_occ=min(tiles.fwd_occ, 2),
            dq_m=min(tiles.dq_m, 64),
            dq_n=min(tiles.dq_n, 64),
            dkv_m=min(tiles.dkv_m, 64),
            dkv_n=min(tiles.dkv_n, 64),
        )
    return tiles


def _block_coords(n_head, SCHED):
    """(batch b, head h, reversed tile index) of this block: the last tile is launched first."""
    if SCHED == HEAD_MAJOR:  # grid (tiles, B*H)
        bh = ct.bid(1)
        rev = ct.num_blocks(0) - 1 - ct.bid(0)
    else:  # grid (B*H, tiles)
        bh = ct.bid(0)
        rev = ct.num_blocks(1) - 1 - ct.bid(1)
    return bh // n_head, bh % n_head, rev


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _scores(q, k_t, j, rows, masked, TILE_M, TILE_N):
    """Raw scores q @ k_t of key tile j, [TILE_M, TILE_N] fp32; with `masked` (only the diagonal tiles pay
    for it), keys after a row's position (rows: [TILE_M, 1]) set to the finite floor."""
    s = ct.mma(q, k_t, ct.zeros((TILE_M, TILE_N), dtype=ct.float32))
    if masked:
        cols = j * TILE_N + ct.arange(TILE_N, dtype=ct.int32)[None, :]  # [1, TILE_N]
        s = ct.where(cols <= rows, s, MASK_FLOOR)
    return s


def _dropout(RNG, bh, t, drop_threshold, keep_scale):
    """What every kernel's dropout needs, as one tuple: the call's two 32-bit keys (read from the device:
    gptcore.kernels.tile_random); the count of head bh's first row (bh * T); the threshold; the kept
    probabilities' scale 1 / (1 - p)."""
    k0, k1 = call_keys(RNG)
    return k0, k1, bh * t, ct.astype(drop_threshold, ct.uint32), keep_scale


def _keep_tile(drop, q_first, k_first, TQ, TK, KEYS_ON_ROWS):
    """Dropout's keep mask of queries [q_first, q_first + TQ) and keys [k_first, k_first + TK) of `drop`'s
    head: [TQ, TK], or [TK, TQ] with KEYS_ON_ROWS (the dK/dV kernel's transposed tiles). One hash per query
    row and one per key, mixed per probability (gptcore.kernels.dropout, which computes the same in
    PyTorch); a draw at or above the threshold p * 2^32 keeps."""
    k0, k1, row0, threshold, _ = drop
    row_hash = row_hashes(row0 + q_first, TQ, k0, k1)  # [TQ]
    col_hash = col_hashes(k_first, TK, k0, k1)  # [TK]
    if KEYS_ON_ROWS:
        return keep(row_hash[None, :], col_hash[:, None], threshold)  # [TK, TQ]
    return keep(row_hash[:, None], col_hash[None, :], threshold)  # [TQ, TK]


def _fwd_step(q, K, V, b, h, j, rows, rows_first, m_i, l_i, acc, qk_scale_log2, masked, D, TILE_M, TILE_N, drop):
    """One key tile of the online softmax. rows: key position of each query row, [TILE_M, 1], the first
    one rows_first (the query indices too: dropout runs with Tq == Tk). `drop`: `_dropout`'s tuple, or None
    without dropout."""
    k_t = ct.load(K, (b, h, 0, j), (1, 1, D, TILE_N), order=(0, 1, 3, 2), padding_mode=ZERO, latency=2).reshape(
        (D, TILE_N)
    )  # [D, TILE_N]
    s = _scores(q, k_t, j, rows, masked, TILE_M, TILE_N)  # [TILE_M, TILE_N]
    m_new = ct.maximum(m_i, ct.max(s, axis=1, keepdims=True))  # [TILE_M, 1], raw score units
    # (s - max) * c, not s * c - max * c (one FFMA): the max entry must get exactly 1.0 (see Numerics)
    p = ct.exp2((s - m_new) * qk_scale_log2, flush_to_zero=True)  # [TILE_M, TILE_N]
    alpha = ct.exp2((m_i - m_new) * qk_scale_log2, flush_to_zero=True)  # [TILE_M, 1]
    l_i = l_i * alpha + ct.sum(p, axis=1, keepdims=True)  # the softmax normalises before dropout
    if drop is not None:  # Tq == Tk: the tile's first query is its first key position
        p = ct.where(_keep_tile(drop, rows_first, j * TILE_N, TILE_M, TILE_N, False), p, 0.0)
    v = ct.load(V, (b, h, j, 0), (1, 1, TILE_N, D), padding_mode=ZERO, latency=4).reshape((TILE_N, D))  # [TILE_N, D]
    acc = ct.mma(p.astype(q.dtype), v, acc * alpha)  # [TILE_M, D]
    return m_new, l_i, acc


def attn_fwd_kernel_body(
    Q,
    K,
    V,
    O,
    STATS,
    RNG,
    qk_scale_log2,
    keep_scale,
    drop_threshold,
    D: ConstInt,
    TILE_M: ConstInt,
    TILE_N: ConstInt,
    SCHED: ConstInt,
    DROPOUT: ConstBool,
):
    """Grid over (B*H, cdiv(Tq, TILE_M)) in SCHED order. Writes O and STATS (2, B, H, Tq): row max of
    the raw scores and log2 of the row sum of exp2((s - max) * scale * log2(e)). With DROPOUT (Tq == Tk),
    the probabilities are dropped by `_keep` and the kept ones scaled by keep_scale = 1 / (1 - p)."""
    tq = Q.shape[2]
    tk = K.shape[2]
    b, h, m_blk = _block_coords(Q.shape[1], SCHED)

    first_key = m_blk * TILE_M + tk - tq  # key position of the tile's first query row
    rows = first_key + ct.arange(TILE_M, dtype=ct.int32)[:, None]  # [TILE_M, 1]
    q = ct.load(Q, (b, h, m_blk, 0), (1, 1, TILE_M, D), padding_mode=ZERO).reshape((TILE_M, D))
    drop = None
    if DROPOUT:
        drop = _dropout(RNG, b * Q.shape[1] + h, tq, drop_threshold, keep_scale)

    m_i = ct.full((TILE_M, 1), MASK_FLOOR, dtype=ct.float32)  # running max of the raw scores
    l_i = ct.zeros((TILE_M, 1), dtype=ct.float32)  # running sum of exp2
    acc = ct.zeros((TILE_M, D), dtype=ct.float32)  # [TILE_M, D]

    # Key tiles [0, n_full) are visible to every row of this query tile: no mask there.
    n_full = (first_key + 1) // TILE_N
    n_all = ct.cdiv(min(first_key + TILE_M, tk), TILE_N)
    for j in range(n_all):
        m_i, l_i, acc = _fwd_step(
            q, K, V, b, h, j, rows, first_key, m_i, l_i, acc, qk_scale_log2, j >= n_full, D, TILE_M, TILE_N, drop
        )

    out = ct.truediv(acc, l_i, flush_to_zero=True, rounding_mode=ct.RoundingMode.APPROX)
    if DROPOUT:
        out = out * keep_scale
    ct.store(O, (b, h, m_blk, 0), out.reshape((1, 1, TILE_M, D)).astype(O.dtype))
    ct.store(STATS, (0, b, h, m_blk), m_i.reshape((1, 1, 1, TILE_M)))
    ct.store(STATS, (1, b, h, m_blk), ct.log2(l_i).reshape((1, 1, 1, TILE_M)))


def _exp2_bias(STATS, b, h, i, qk_scale_log2, TILE_M):
    """max * scale * log2(e) + log2(sum) of query tile i's rows, [1, TILE_M]: the backward's
    P = exp2(s * scale * log2(e) - bias) is then one FFMA and one exp2 per score (see Numerics)."""
    m = ct.load(STATS, (0, b, h, i), (1, 1, 1, TILE_M), padding_mode=ZERO).reshape((1, TILE_M))
    log2_l = ct.load(STATS, (1, b, h, i), (1, 1, 1, TILE_M), padding_mode=ZERO).reshape((1, TILE_M))
    return m * qk_scale_log2 + log2_l


def _dq_step(q, do, bias, delta, K, V, b, h, j, rows, rows_first, dq, qk_scale_log2, masked, D, TILE_M, TILE_N, drop):
    k = ct.load(K, (b, h, j, 0), (1, 1, TILE_N, D), padding_mode=ZERO, latency=2).reshape((TILE_N, D))  # [TILE_N, D]
    v_t = ct.load(V, (b, h, 0, j), (1, 1, D, TILE_N), order=(0, 1, 3, 2), padding_mode=ZERO, latency=2).reshape(
        (D, TILE_N)
    )  # [D, TILE_N]
    s = _scores(q, ct.transpose(k), j, rows, masked, TILE_M, TILE_N)  # [TILE_M, TILE_N]
    p = ct.exp2(s * qk_scale_log2 - bias, flush_to_zero=True)  # [TILE_M, TILE_N]
    dp = ct.mma(do, v_t, ct.zeros((TILE_M, TILE_N), dtype=ct.float32))  # [TILE_M, TILE_N]
    if drop is not None:  # the gradient reaches the kept probabilities only, scaled as they were
        keep_scale = drop[4]
        dp = ct.where(_keep_tile(drop, rows_first, j * TILE_N, TILE_M, TILE_N, False), dp * keep_scale, 0.0)
    ds = p * (dp - delta)  # [TILE_M, TILE_N]
    return ct.mma(ds.astype(q.dtype), k, dq)  # [TILE_M, D]


def attn_bwd_dq_kernel_body(
    Q,
    K,
    V,
    O,
    DO,
    STATS,
    DELTA,
    DQ,
    RNG,
    qk_scale_log2,
    qk_scale,
    keep_scale,
    drop_threshold,
    D: ConstInt,
    TILE_M: ConstInt,
    TILE_N: ConstInt,
    SCHED: ConstInt,
    DROPOUT: ConstBool,
):
    """Grid over (B*H, cdiv(T, TILE_M)) in SCHED order. Writes DELTA = rowsum(dO * O) and dQ (with dropout
    O is the dropped output, and rowsum(dO * O) is still the sum of P times its gradient)."""
    tq = Q.shape[2]
    tk = K.shape[2]
    b, h, m_blk = _block_coords(Q.shape[1], SCHED)

    q = ct.load(Q, (b, h, m_blk, 0), (1, 1, TILE_M, D), padding_mode=ZERO).reshape((TILE_M, D))
    do = ct.load(DO, (b, h, m_blk, 0), (1, 1, TILE_M, D), padding_mode=ZERO).reshape((TILE_M, D))
    o = ct.load(O, (b, h, m_blk, 0), (1, 1, TILE_M, D), padding_mode=ZERO).reshape((TILE_M, D))
    delta = ct.sum(do.astype(ct.float32) * o.astype(ct.float32), axis=1, keepdims=True)  # [TILE_M, 1]
    ct.store(DELTA, (b, h, m_blk), delta.reshape((1, 1, TILE_M)))
    bias = _exp2_bias(STATS, b, h, m_blk, qk_scale_log2, TILE_M).reshape((TILE_M, 1))  # [TILE_M, 1]
    drop = None
    if DROPOUT:
        drop = _dropout(RNG, b * Q.shape[1] + h, tq, drop_threshold, keep_scale)

    first_key = m_blk * TILE_M + tk - tq
    rows = first_key + ct.arange(TILE_M, dtype=ct.int32)[:, None]  # [TILE_M, 1]
    dq = ct.zeros((TILE_M, D), dtype=ct.float32)  # [TILE_M, D]
    n_full = (first_key + 1) // TILE_N
    n_all = ct.cdiv(min(first_key + TILE_M, tk), TILE_N)
    for j in range(n_all):
        dq = _dq_step(
            q, do, bias, delta, K, V, b, h, j, rows, first_key, dq, qk_scale_log2, j >= n_full, D, TILE_M, TILE_N, drop
        )
    dq = dq * qk_scale
    ct.store(DQ, (b, h, m_blk, 0), dq.reshape((1, 1, TILE_M, D)).astype(DQ.dtype))


def _dkv_step(
    k, v, Q, DO, STATS, DELTA, b, h, i, keys, keys_first, dk, dv, qk_scale_log2, masked, D, TILE_M, TILE_N, drop
):
    """One query tile i against this block's key tile; everything transposed: [TILE_N, TILE_M]."""
    q = ct.load(Q, (b, h, i, 0), (1, 1, TILE_M, D), padding_mode=ZERO, latency=2).reshape((TILE_M, D))
    do = ct.load(DO, (b, h, i, 0), (1, 1, TILE_M, D), padding_mode=ZERO, latency=2).reshape((TILE_M, D))
    bias = _exp2_bias(STATS, b, h, i, qk_scale_log2, TILE_M)  # [1, TILE_M]
    delta = ct.load(DELTA, (b, h, i), (1, 1, TILE_M), padding_mode=ZERO).reshape((1, TILE_M))
    s_t = ct.mma(k, ct.transpose(q), ct.zeros((TILE_N, TILE_M), dtype=ct.float32))  # [TILE_N, TILE_M]
    qpos = i * TILE_M + ct.arange(TILE_M, dtype=ct.int32)[None, :]  # [1, TILE_M]
    if masked:
        s_t = ct.where(keys <= qpos, s_t, MASK_FLOOR)
    p_t = ct.exp2(s_t * qk_scale_log2 - bias, flush_to_zero=True)  # [TILE_N, TILE_M]
    dp_t = ct.mma(v, ct.transpose(do), ct.zeros((TILE_N, TILE_M), dtype=ct.float32))  # [TILE_N, TILE_M]
    if drop is not None:  # the same mask as the forward's, transposed: keys along rows, queries along columns
        keep_scale = drop[4]
        keep_t = _keep_tile(drop, i * TILE_M, keys_first, TILE_M, TILE_N, True)  # [TILE_N, TILE_M]
        dv = ct.mma(ct.where(keep_t, p_t * keep_scale, 0.0).astype(q.dtype), do, dv)  # [TILE_N, D]
        dp_t = ct.where(keep_t, dp_t * keep_scale, 0.0)
    else:
        dv = ct.mma(p_t.astype(q.dtype), do, dv)  # [TILE_N, D]
    ds_t = p_t * (dp_t - delta)  # [TILE_N, TILE_M]
    dk = ct.mma(ds_t.astype(q.dtype), q, dk)  # [TILE_N, D]
    return dk, dv


def attn_bwd_dkdv_kernel_body(
    Q,
    K,
    V,
    DO,
    STATS,
    DELTA,
    DK,
    DV,
    RNG,
    qk_scale_log2,
    qk_scale,
    keep_scale,
    drop_threshold,
    D: ConstInt,
    TILE_M: ConstInt,
    TILE_N: ConstInt,
    SCHED: ConstInt,
    DROPOUT: ConstBool,
):
    """Grid over (B*H, cdiv(T, TILE_N)) in SCHED order; needs Tq == Tk. Key tile 0 sees every query,
    so the tile index runs backwards: n_blk = tiles - 1 - (reversed index) puts tile 0 first."""
    t = Q.shape[2]
    b, h, rev = _block_coords(Q.shape[1], SCHED)
    n_blk = ct.cdiv(t, TILE_N) - 1 - rev

    k = ct.load(K, (b, h, n_blk, 0), (1, 1, TILE_N, D), padding_mode=ZERO).reshape((TILE_N, D))
    v = ct.load(V, (b, h, n_blk, 0), (1, 1, TILE_N, D), padding_mode=ZERO).reshape((TILE_N, D))
    keys = n_blk * TILE_N + ct.arange(TILE_N, dtype=ct.int32)[:, None]  # [TILE_N, 1]
    dk = ct.zeros((TILE_N, D), dtype=ct.float32)
    dv = ct.zeros((TILE_N, D), dtype=ct.float32)
    drop = None
    if DROPOUT:
        drop = _dropout(RNG, b * Q.shape[1] + h, t, drop_threshold, keep_scale)

    n_q = ct.cdiv(t, TILE_M)
    first = (n_blk * TILE_N) // TILE_M  # first query tile with a row at or after this key tile
    # From here on every query row sits at or after the tile's last key: no mask needed.
    unmasked = min(ct.cdiv(n_blk * TILE_N + TILE_N - 1, TILE_M), n_q)
    for i in range(first, n_q):
        dk, dv = _dkv_step(
            k,
            v,
            Q,
            DO,
            STATS,
            DELTA,
            b,
            h,
            i,
            keys,
            n_blk * TILE_N,
            dk,
            dv,
            qk_scale_log2,
            i < unmasked,
            D,
            TILE_M,
            TILE_N,
            drop,
        )
    dk = dk * qk_scale
    ct.store(DK, (b, h, n_blk, 0), dk.reshape((1, 1, TILE_N, D)).astype(DK.dtype))
    ct.store(DV, (b, h, n_blk, 0), dv.reshape((1, 1, TILE_N, D)).astype(DV.dtype))


@cache
def fwd_kernel(occupancy: int):
    """The forward kernel compiled with a given occupancy hint (one kernel object per value)."""
    return ct.kernel(attn_fwd_kernel_body, occupancy=occupancy)


@cache
def bwd_dq_kernel(occupancy: int):
    return ct.kernel(attn_bwd_dq_kernel_body, occupancy=occupancy)


@cache
def bwd_dkdv_kernel(occupancy: int):
    return ct.kernel(attn_bwd_dkdv_kernel_body, occupancy=occupancy)


# --------------------------------------------------------------------------------------------------
# Launch specs: each kernel's grid and arguments, by name, from the tensors and the tiles. Without dropout
# the stats array stands in for the keys, which the constant DROPOUT flag keeps unread.
# --------------------------------------------------------------------------------------------------
MAX_GRID_Y = 65535


def _order(sched: int, bh: int) -> int:
    """HEAD_MAJOR puts B*H on the grid's y axis (at most 65535); beyond that, use LONGEST_FIRST."""
    return sched if sched != HEAD_MAJOR or bh <= MAX_GRID_Y else LONGEST_FIRST


def _grid(sched: int, bh: int, tiles: int) -> tuple[int, int, int]:
    return (tiles, bh, 1) if sched == HEAD_MAJOR else (bh, tiles, 1)


def _dropout_args(rng, stats, dropout_p: float) -> dict:
    return dict(
        RNG=rng if dropout_p > 0 else stats,
        keep_scale=1.0 / (1.0 - dropout_p),
        drop_threshold=dropout_threshold(dropout_p),
        DROPOUT=dropout_p > 0,
    )


def fwd_spec(q, k, v, o, stats, rng, *, scale: float, dropout_p: float, tiles: AttnTiles) -> LaunchSpec:
    """q, o (B, H, Tq, D); k, v (B, H, Tk, D); stats (2, B, H, Tq) fp32; rng the dropout keys or None."""
    bsz, n_head, tq, d = q.shape
    sched = _order(tiles.fwd_order(tq), bsz * n_head)
    args = dict(
        Q=q,
        K=k,
        V=v,
        O=o,
        STATS=stats,
        qk_scale_log2=scale * LOG2E,
        **_dropout_args(rng, stats, dropout_p),
        D=padded_head_dim(d),
        TILE_M=tiles.fwd_m,
        TILE_N=tiles.fwd_n,
        SCHED=sched,
    )
    grid = _grid(sched, bsz * n_head, cdiv(tq, tiles.fwd_m))
    return LaunchSpec(attn_fwd_kernel_body, fwd_kernel(tiles.fwd_occ), grid, args)


def bwd_dq_spec(
    q, k, v, o, do, stats, delta, dq, rng, *, scale: float, dropout_p: float, tiles: AttnTiles
) -> LaunchSpec:
    """delta (B, H, T) fp32, written here for the dK/dV kernel; dq like q."""
    bsz, n_head, t, d = q.shape
    sched = _order(tiles.bwd_sched, bsz * n_head)
    args = dict(
        Q=q,
        K=k,
        V=v,
        O=o,
        DO=do,
        STATS=stats,
        DELTA=delta,
        DQ=dq,
        qk_scale_log2=scale * LOG2E,
        qk_scale=scale,
        **_dropout_args(rng, stats, dropout_p),
        D=padded_head_dim(d),
        TILE_M=tiles.dq_m,
        TILE_N=tiles.dq_n,
        SCHED=sched,
    )
    grid = _grid(sched, bsz * n_head, cdiv(t, tiles.dq_m))
    return LaunchSpec(attn_bwd_dq_kernel_body, bwd_dq_kernel(tiles.dq_occ), grid, args)


def bwd_dkdv_spec(
    q, k, v, do, stats, delta, dk, dv, rng, *, scale: float, dropout_p: float, tiles: AttnTiles
) -> LaunchSpec:
    """dk, dv like k and v; delta from the dQ kernel."""
    bsz, n_head, t, d = q.shape
    sched = _order(tiles.bwd_sched, bsz * n_head)
    args = dict(
        Q=q,
        K=k,
        V=v,
        DO=do,
        STATS=stats,
        DELTA=delta,
        DK=dk,
        DV=dv,
        qk_scale_log2=scale * LOG2E,
        qk_scale=scale,
        **_dropout_args(rng, stats, dropout_p),
        D=padded_head_dim(d),
        TILE_M=tiles.dkv_m,
        TILE_N=tiles.dkv_n,
        SCHED=sched,
    )
    grid = _grid(sched, bsz * n_head, cdiv(t, tiles.dkv_n))
    return LaunchSpec(attn_bwd_dkdv_kernel_body, bwd_dkdv_kernel(tiles.dkv_occ), grid, args)


# --------------------------------------------------------------------------------------------------
# Launch helpers: allocate the outputs, build the specs, launch. `tiles` is an explicit configuration (a
# tuning candidate); None takes the architecture's table.
# --------------------------------------------------------------------------------------------------
@cache
def _table_tiles(device_index: int, head_dim: int) -> AttnTiles:
    return tiles_for(arch_of(device_index), head_dim)


def _as_tiled(x: torch.Tensor) -> torch.Tensor:
    """cuTile needs a unit last stride and 16-byte aligned other strides; copy only when not so."""
    esize = x.element_size()
    if x.stride(-1) != 1 or any((s * esize) % 16 for s in x.stride()[:-1]) or x.data_ptr() % 16:
        return x.contiguous()
    return x


def _bhtd_empty_like(x: torch.Tensor, t: int) -> torch.Tensor:
    """An empty (B, H, t, D) tensor laid out (B, t, H, D): the caller's transpose back is free."""
    b, h, _, d = x.shape
    return torch.empty(b, t, h, d, device=x.device, dtype=x.dtype).transpose(1, 2)


def fwd_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's empty o (B, H, Tq, D), laid out (B, Tq, H, D), and stats (2, B, H, Tq) fp32."""
    bsz, n_head, tq, _ = q.shape
    return _bhtd_empty_like(q, tq), torch.empty(2, bsz, n_head, tq, device=q.device, dtype=torch.float32)


def bwd_outputs(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backward's empty dq, dk, dv (like q, laid out (B, T, H, D)) and delta (B, H, T) fp32."""
    bsz, n_head, t, _ = q.shape
    grads = tuple(_bhtd_empty_like(q, t) for _ in range(3))
    return (*grads, torch.empty(bsz, n_head, t, device=q.device, dtype=torch.float32))


def logsumexp(stats: torch.Tensor, scale: float) -> torch.Tensor:
    """The natural-log log-sum-exp (B, H, Tq) of the scaled, masked scores, from the forward's stats:
    what torch.logsumexp(scale * q @ k^T, masked) gives."""
    return stats[0].double() * scale + stats[1].double() * LN2


def attention_forward(q, k, v, *, scale: float, dropout_p: float = 0.0, rng=None, tiles: AttnTiles | None = None):
    """Launch the forward kernel. Returns (o, stats), stats (2, B, H, Tq) fp32 (see `logsumexp`).
    With dropout_p > 0, `rng` holds the call's keys (`dropout_rng`)."""
    q, k, v = _as_tiled(q), _as_tiled(k), _as_tiled(v)
    dev = q.get_device()
    tiles = tiles or _table_tiles(dev, q.shape[3])
    o, stats = fwd_outputs(q)
    launch(fwd_spec(q, k, v, o, stats, rng, scale=scale, dropout_p=dropout_p, tiles=tiles), dev)
    return o, stats


def attention_backward(
    q, k, v, o, stats, do, *, scale: float, dropout_p: float = 0.0, rng=None, tiles: AttnTiles | None = None, out=None
):
    """Launch the two backward kernels. Returns (dq, dk, dv): new tensors, or `out`'s three views written."""
    q, k, v, o, do = (_as_tiled(x) for x in (q, k, v, o, do))
    if k.shape[2] != q.shape[2]:
        raise NotImplementedError(
            f"cuTile attention backward needs Tq == Tk, got Tq={q.shape[2]} Tk={k.shape[2]} "
            "(the KV-cache path is inference-only)"
        )
    dev = q.get_device()
    tiles = tiles or _table_tiles(dev, q.shape[3])
    if out is None:
        dq, dk, dv, delta = bwd_outputs(q)
    else:
        (dq, dk, dv), delta = out, torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    common = dict(scale=scale, dropout_p=dropout_p, tiles=tiles)
    launch(bwd_dq_spec(q, k, v, o, do, stats, delta, dq, rng, **common), dev)
    launch(bwd_dkdv_spec(q, k, v, do, stats, delta, dk, dv, rng, **common), dev)
    return dq, dk, dv


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"causal_attention expects (B, H, T, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"causal_attention needs Tq <= Tk, got Tq={q.shape[2]} Tk={k.shape[2]}")
    if q.shape[2] < 1:
        raise ValueError("causal_attention needs at least one query")
    if q.dtype not in ATTENTION_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"cuTile causal_attention supports bf16 and fp16 (q, k, v alike), got "
            f"{q.dtype}, {k.dtype}, {v.dtype}; cast to bf16 or use autocast"
        )
    reason = attention_head_dim_unsupported(q.shape[3])
    if reason:
        raise ValueError(f"causal_attention: {reason}")
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise RuntimeError("cuTile causal_attention needs CUDA tensors")


# --------------------------------------------------------------------------------------------------
# The custom operators: opaque to torch.compile (no graph break), with shapes for fake tensors and the
# backward registered, so the model compiles with fullgraph=True, exports and captures in CUDA graphs.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("gptcore::attention_fwd", mutates_args=(), device_types="cuda")
def attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rng: torch.Tensor | None, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale=scale, dropout_p=dropout_p, rng=rng)


@attention_fwd_op.register_fake
def _(q, k, v, rng, scale, dropout_p):
    return fwd_outputs(q)


@torch.library.custom_op("gptcore::attention_bwd", mutates_args=(), device_types="cuda")
def attention_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    stats: torch.Tensor,
    do: torch.Tensor,
    rng: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(q, k, v, o, stats, do, scale=scale, dropout_p=dropout_p, rng=rng)


@attention_bwd_op.register_fake
def _(q, k, v, o, stats, do, rng, scale, dropout_p):
    return bwd_outputs(q)[:3]


def _setup_context(ctx, inputs, output):
    q, k, v, rng, scale, dropout_p = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, o, stats, rng)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward(ctx, do, _dstats):
    q, k, v, o, stats, rng = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(q, k, v, o, stats, do, rng, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The eager path: autograd calls the launch helpers directly, without the custom operators' dispatch
    (their Python layers cost more host time than the kernels take at small sizes). Code being traced
    (torch.compile, export) and tensor subclasses take the operators (`launches_directly` decides)."""

    @staticmethod
    def forward(ctx, q, k, v, rng, scale, dropout_p):
        o, stats = attention_forward(q, k, v, scale=scale, dropout_p=dropout_p, rng=rng)
        ctx.save_for_backward(q, k, v, o, stats, rng)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, rng = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, o, stats, do, scale=ctx.scale, dropout_p=ctx.dropout_p, rng=rng)
        return dq, dk, dv, None, None, None


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> torch.Tensor:
    """dropout(softmax(scale * q @ k^T, causal, bottom-right aligned)) @ v on cuTile kernels.

    q (B, H, Tq, D), k and v (B, H, Tk, D), Tq <= Tk, bf16 or fp16, D a multiple of 16 up to 128. Differentiable
    when Tq == Tk. Default scale 1/sqrt(D). dropout_p drops attention probabilities with the kernels'
    counter-based mask (needs Tq == Tk, as in training), its keys `rng` drawn from the default CUDA
    generator unless given (gptcore.kernels.dropout).
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention dropout_p must be in [0, 1), got {dropout_p}")
    same_length = q.shape[2] == k.shape[2]
    if not same_length and (dropout_p > 0 or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))):
        raise NotImplementedError(
            f"cuTile attention backward and dropout need Tq == Tk, got Tq={q.shape[2]} Tk={k.shape[2]}: run "
            "KV-cache decoding under torch.no_grad(), without dropout"
        )
    if dropout_p > 0 and rng is None:
        rng = dropout_rng(q.device)
    scale, dropout_p = float(scale), float(dropout_p)
    if not launches_directly(q, k, v):
        return attention_fwd_op(q, k, v, rng, scale, dropout_p)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, rng, scale, dropout_p)
    return attention_forward(q, k, v, scale=scale, dropout_p=dropout_p, rng=rng)[0]


# --------------------------------------------------------------------------------------------------
# Attention on the packed c_attn output (B, T, 3C): q, k and v are strided views of it, and the backward writes
# dq, dk and dv into one (B, T, 3C) gradient, the layout c_attn's backward reads, so autograd never
# concatenates three gradients (a copy of the whole activation per layer).
# --------------------------------------------------------------------------------------------------
def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, D) as views of qkv (B, T, 3C), as the model's split, view and transpose make them."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    return tuple(x.view(b, t, n_head, c // n_head).transpose(1, 2) for x in qkv.split(c, dim=2))


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """o (B, H, T, D), laid out (B, T, H, D), as (B, T, H * D): a view."""
    b, h, t, d = o.shape
    return o.transpose(1, 2).reshape(b, t, h * d)


def _packed_backward(qkv, o, stats, do, rng, n_head, scale, dropout_p):
    """dqkv (B, T, 3C) from do (B, H, T, D), the gradient of o."""
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = split_heads(qkv, n_head)
    attention_backward(q, k, v, o, stats, do, scale=scale, dropout_p=dropout_p, rng=rng, out=split_heads(dqkv, n_head))
    return dqkv


@torch.library.custom_op("gptcore::attention_qkv_fwd", mutates_args=(), device_types="cuda")
def attention_qkv_fwd_op(
    qkv: torch.Tensor, rng: torch.Tensor | None, n_head: int, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, T, D) laid out (B, T, H, D), and the forward's stats."""
    return attention_forward(*split_heads(qkv, n_head), scale=scale, dropout_p=dropout_p, rng=rng)


@attention_qkv_fwd_op.register_fake
def _(qkv, rng, n_head, scale, dropout_p):
    return fwd_outputs(split_heads(qkv, n_head)[0])


@torch.library.custom_op("gptcore::attention_qkv_bwd", mutates_args=(), device_types="cuda")
def attention_qkv_bwd_op(
    qkv: torch.Tensor,
    o: torch.Tensor,
    stats: torch.Tensor,
    do: torch.Tensor,
    rng: torch.Tensor | None,
    n_head: int,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """The gradient of qkv (B, T, 3C) from do (B, H, T, D), the gradient of o."""
    return _packed_backward(qkv, o, stats, do, rng, n_head, scale, dropout_p)


@attention_qkv_bwd_op.register_fake
def _(qkv, o, stats, do, rng, n_head, scale, dropout_p):
    return torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)


def _packed_setup_context(ctx, inputs, output):
    qkv, rng, n_head, scale, dropout_p = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(qkv, o, stats, rng)
    ctx.n_head, ctx.scale, ctx.dropout_p = n_head, scale, dropout_p


def _packed_backward_op(ctx, do, _dstats):
    qkv, o, stats, rng = ctx.saved_tensors
    return attention_qkv_bwd_op(qkv, o, stats, do, rng, ctx.n_head, ctx.scale, ctx.dropout_p), None, None, None, None


attention_qkv_fwd_op.register_autograd(_packed_backward_op, setup_context=_packed_setup_context)


class _EagerPackedAttention(torch.autograd.Function):
    """The eager path of the packed attention: the launch helpers without the custom operators' dispatch."""

    @staticmethod
    def forward(ctx, qkv, rng, n_head, scale, dropout_p):
        o, stats = attention_forward(*split_heads(qkv, n_head), scale=scale, dropout_p=dropout_p, rng=rng)
        ctx.save_for_backward(qkv, o, stats, rng)
        ctx.n_head, ctx.scale, ctx.dropout_p = n_head, scale, dropout_p
        return merge_heads(o)

    @staticmethod
    def backward(ctx, dy):
        qkv, o, stats, rng = ctx.saved_tensors
        b, h, t, d = o.shape
        do = dy.reshape(b, t, h, d).transpose(1, 2)
        return _packed_backward(qkv, o, stats, do, rng, ctx.n_head, ctx.scale, ctx.dropout_p), None, None, None, None


def causal_attention_qkv(
    qkv: torch.Tensor, n_head: int, dropout_p: float = 0.0, rng: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal self-attention of the packed c_attn output qkv (B, T, 3C) with n_head heads, merged back to
    (B, T, C): `causal_attention` on its split heads, with the gradient of qkv written packed."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(
            f"causal_attention_qkv expects (B, T, 3C) with C a multiple of {n_head}, got {tuple(qkv.shape)}"
        )
    q, k, v = split_heads(qkv, n_head)
    _check(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention_qkv dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and rng is None:
        rng = dropout_rng(qkv.device)
    scale, dropout_p = 1.0 / math.sqrt(q.shape[-1]), float(dropout_p)
    if not launches_directly(qkv):
        return merge_heads(attention_qkv_fwd_op(qkv, rng, n_head, scale, dropout_p)[0])
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _EagerPackedAttention.apply(qkv, rng, n_head, scale, dropout_p)
    return merge_heads(attention_forward(q, k, v, scale=scale, dropout_p=dropout_p, rng=rng)[0])
