"""Dropout's counter-based random numbers inside cuTile kernels: the tile-side twin of gptcore.kernels.dropout.

A call's two 32-bit keys come from the device (an int64 (2,) tensor drawn from the default CUDA generator),
so a replayed CUDA graph reads each replay's new draw where a kernel argument would stay frozen at capture.
Every row count and every column gets one keyed hash, computed once per tile row or column, and an element's
draw is a short mix of the two (`keep`): the attention kernels count rows as head * T + query and columns as
keys, the residual kernels count rows as tokens and columns as features. dropout.py computes the same masks
in PyTorch (`dropout_keep_mask`, `rows_keep_mask`), which the tests compare the kernels against.
"""

from __future__ import annotations

import cuda.tile as ct

from gptcore.kernels.dropout import MIX_A, MIX_B


def mix32(x):
    """The 32-bit mixer of gptcore.kernels.dropout.mix32 (lowbias32) on a uint32 tile."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def call_keys(RNG):
    """The call's two keys as uint32 scalars, from the int64 (2,) array `RNG` (gptcore.kernels.dropout.dropout_rng)."""
    keys = ct.load(RNG, (0,), (2,))
    k0 = ct.astype(ct.bitcast(ct.extract(keys, (0,), shape=(1,)).item(), ct.uint64), ct.uint32)
    k1 = ct.astype(ct.bitcast(ct.extract(keys, (1,), shape=(1,)).item(), ct.uint64), ct.uint32)
    return k0, k1


def row_hashes(first, COUNT, k0, k1):
    """The keyed hashes of row counts [first, first + COUNT): [COUNT] uint32 (dropout.keyed_hash(r, k0, k1))."""
    rows = first + ct.arange(COUNT, dtype=ct.int32)
    return mix32(mix32(ct.astype(rows, ct.uint32) ^ k0) + k1)


def col_hashes(first, COUNT, k0, k1):
    """The keyed hashes of columns [first, first + COUNT): [COUNT] uint32 (dropout.keyed_hash(c, k1, k0))."""
    cols = first + ct.arange(COUNT, dtype=ct.int32)
    return mix32(mix32(ct.astype(cols, ct.uint32) ^ k1) + k0)


def keep(row_hash, col_hash, threshold):
    """Whether each element is kept, from broadcastable row and column hashes (dropout.draw): a draw at or above
    the threshold round(p * 2^32) keeps."""
    x = (row_hash ^ col_hash) * MIX_A
    x = x ^ (x >> 16)
    return x * MIX_B >= threshold
