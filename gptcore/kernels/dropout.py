"""Attention dropout's random numbers: the keys of one call and the keep mask they give.

The flash kernels never materialise the attention matrix, so they cannot take a mask: each kernel
recomputes it from the call's two keys and the coordinates of each probability, the backward exactly as
the forward (`_keep_tile` in attention.py). The kernels are bound by integer throughput there, so the hash
is split: every query row of the call gets one 32-bit hash R (of its head and position) and every key
position one hash C, both keyed by the call's two keys and computed once per tile row or column,
and a probability's draw is a short mix of R ^ C: two multiplies and an xorshift, 7 integer operations per
probability with its compare and select, against 13 for a full hash per probability. The final mix is what
makes two rows' (or two columns') masks independent: a single multiply leaves pairs of rows whose masks
agree far more often than chance (tests/test_dropout.py measures every pair). A draw at or above the
threshold round(p * 2^32) keeps, so the drop probability is p to 2^-33. Rows are counted head * T + query in
32 bits, distinct up to B * H * T = 2^31 rows a call.

The keys come from the default CUDA generator, so a run is reproducible from its RNG state
(torch.manual_seed, a checkpoint) and every replay of a captured CUDA graph draws new ones.
`dropout_keep_mask` computes the same mask in PyTorch, for tests and verification. The fused residual kernels
(gptcore/kernels/residual_layernorm.py) drop the features of a (tokens, features) activation with the same
hash, a row per token and a column per feature: `rows_keep_mask` is their copy.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
MIX_A, MIX_B = 0x9E3779B1, 0x85EBCA6B  # the per-probability mix's odd multipliers


def dropout_threshold(p: float) -> int:
    """The kernels' drop threshold for probability p: round(p * 2^32), as the int32 bit pattern a kernel
    argument carries (ct.launch types Python ints as int32; the kernels read it as uint32)."""
    t = min(round(p * 2**32), M32)
    return t - 2**32 if t >= 2**31 else t


def dropout_rng(device: torch.device) -> torch.Tensor:
    """One call's two dropout keys, drawn from the default CUDA generator: reproducible from its state
    (torch.manual_seed, a checkpoint's RNG state) and drawn anew by every replay of a captured graph."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' 32-bit mixer on int64 tensors holding uint32 values (Wellons' lowbias32: an xorshift-
    multiply bijection whose every input bit flips each output bit with probability close to 1/2)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def keyed_hash(count: torch.Tensor, key: int, other_key: int) -> torch.Tensor:
    """A row's (or a column's) hash: both keys enter, each through its own mix, so two calls whose keys
    share many bits still get unrelated hashes (one xor-keyed mix would give them permutations of each other)."""
    return mix32((mix32(count ^ key) + other_key) & M32)


def draw(row_hash: torch.Tensor, col_hash: torch.Tensor) -> torch.Tensor:
    """The per-probability mix of a row's and a column's hash (broadcastable int64 tensors of uint32 values)."""
    x = ((row_hash ^ col_hash) * MIX_A) & M32
    x = x ^ (x >> 16)
    return (x * MIX_B) & M32


def _keep(rng: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Whether each (row count, column) pair is kept: rows and cols broadcastable int64 tensors."""
    k0, k1 = (int(v) & M32 for v in rng.to("cpu", torch.int64))
    row_hash, col_hash = keyed_hash(rows & M32, k0, k1), keyed_hash(cols, k1, k0)
    return (draw(row_hash, col_hash) >= dropout_threshold(p) & M32).to(rng.device)


def dropout_keep_mask(rng: torch.Tensor, b: int, h: int, tq: int, tk: int, p: float) -> torch.Tensor:
    """The keep mask (B, H, Tq, Tk) the kernels apply for keys `rng` and probability p (dropout runs with
    Tq == Tk), computed in PyTorch with the kernels' hash: what tests and verification compare against."""
    if tq != tk:
        raise ValueError(f"attention dropout needs Tq == Tk, got Tq={tq} Tk={tk}")
    rows = torch.arange(b * h * tq, dtype=torch.int64).view(b, h, tq, 1)  # head * T + query: one count per row
    return _keep(rng, rows, torch.arange(tk, dtype=torch.int64).view(1, 1, 1, tk), p)


def rows_keep_mask(rng: torch.Tensor, m: int, n: int, p: float) -> torch.Tensor:
    """The keep mask (M, N) of dropout on the rows of an activation (M tokens, N features), as the fused
    residual kernels draw it: the same hash, row r of the call counted as r and column c as c."""
    rows = torch.arange(m, dtype=torch.int64).view(m, 1)
    return _keep(rng, rows, torch.arange(n, dtype=torch.int64).view(1, n), p)
