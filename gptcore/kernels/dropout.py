"""Attention dropout's random numbers: the keys of one call and the keep mask they give.

The flash kernels never materialise the attention matrix, so they cannot take a mask: each kernel
recomputes it from the call's two keys and the coordinates of each probability (a counter-based hash,
`_keep` in attention.py), the backward exactly as the forward. The keys come from the default CUDA
generator, so a run is reproducible from its RNG state (torch.manual_seed, a checkpoint) and every replay
of a captured CUDA graph draws new ones. `dropout_keep_mask` computes the same mask in PyTorch, for tests
and verification.
"""

from __future__ import annotations

import torch


def dropout_threshold(p: float) -> int:
    """The kernels' drop threshold for probability p: round(p * 2^32), as the int32 bit pattern a kernel
    argument carries (ct.launch types Python ints as int32; the kernels read it as uint32)."""
    t = min(round(p * 2**32), 2**32 - 1)
    return t - 2**32 if t >= 2**31 else t


def dropout_rng(device: torch.device) -> torch.Tensor:
    """One call's two dropout keys, drawn from the default CUDA generator: reproducible from its state
    (torch.manual_seed, a checkpoint's RNG state) and drawn anew by every replay of a captured graph."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def dropout_keep_mask(rng: torch.Tensor, b: int, h: int, tq: int, tk: int, p: float) -> torch.Tensor:
    """The keep mask (B, H, Tq, Tk) the kernels apply for keys `rng` and probability p, computed in
    PyTorch with the kernels' hash (`_keep` in attention.py): what tests and verification compare against."""
    m32 = 0xFFFFFFFF

    def fmix32(x):
        x = x ^ (x >> 16)
        x = (x * 0x85EBCA6B) & m32
        x = x ^ (x >> 13)
        x = (x * 0xC2B2AE35) & m32
        return x ^ (x >> 16)

    keys = rng.to("cpu", torch.int64) & m32
    rows = torch.arange(tq, dtype=torch.int64)[:, None]
    cols = torch.arange(tk, dtype=torch.int64)[None, :]
    heads = (torch.arange(b * h, dtype=torch.int64) * 0x9E3779B1 & m32).view(b, h, 1, 1)
    x = fmix32(((rows << 16) | cols) ^ keys[0])
    x = fmix32(x ^ keys[1] ^ heads)
    return (x >= (dropout_threshold(p) & m32)).to(rng.device)
