"""The attention dropout's keep mask as the kernels draw it (gptcore.kernels.dropout, the PyTorch copy of
the kernels' hash that the GPU tests compare the kernels against): the rate is 1 - p, and it does not depend
on the position, the head or the call, nor do two rows', two columns' or a rectangle's corners' decisions
depend on each other (the hash is one per row and one per column, mixed per probability)."""

from __future__ import annotations

import math

import pytest
import torch

from gptcore.kernels.dropout import dropout_keep_mask, dropout_threshold

B, H, T = 4, 10, 512  # 1.05e7 draws


def sigmas(rate: float, expected: float, draws: int) -> float:
    return abs(rate - expected) / math.sqrt(expected * (1 - expected) / draws)


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.2, 0.5, 0.9])
def test_the_threshold_is_p_in_32_bits(p):
    assert abs((dropout_threshold(p) % 2**32) / 2**32 - p) <= 2**-33


@pytest.mark.parametrize("p", [0.1, 0.2])
def test_keep_rate_is_one_minus_p_everywhere(p):
    keep = dropout_keep_mask(torch.tensor([0x1234_5678_9ABC, 0x0FED_CBA9_8765]), B, H, T, T, p)
    assert keep.shape == (B, H, T, T)
    assert sigmas(keep.float().mean().item(), 1 - p, keep.numel()) < 4
    per_head = keep.float().mean(dim=(2, 3)).flatten()  # each head: T*T draws
    assert max(sigmas(r, 1 - p, T * T) for r in per_head.tolist()) < 4
    for name, part in (
        ("early queries", keep[:, :, : T // 8]),
        ("late queries", keep[:, :, -T // 8 :]),
        ("even keys", keep[..., 0::2]),
        ("odd keys", keep[..., 1::2]),
        ("first keys", keep[..., :8]),
    ):
        assert sigmas(part.float().mean().item(), 1 - p, part.numel()) < 4, name


@pytest.mark.parametrize("seed", [0, 1])
def test_no_two_rows_or_columns_agree_more_than_chance(seed):
    """Every pair of rows (and of columns) of a 1024 x 1024 head: how often their decisions agree. Of ~5.2e5
    pairs, independent masks put ~3.6 beyond 4.5 sigma and none beyond 6; a single-multiply mix puts 18-37
    beyond 4.5 and reaches 6.5-10."""
    p, t = 0.2, 1024
    rng = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed))
    keep = dropout_keep_mask(rng, 1, 1, t, t, p)[0, 0].float()
    expected = p * p + (1 - p) ** 2
    sigma = math.sqrt(expected * (1 - expected) / t)
    pairs = torch.ones(t, t, dtype=torch.bool).triu(1)
    for name, m in (("rows", keep), ("columns", keep.T)):
        z = (((m @ m.T + (1 - m) @ (1 - m).T) / t - expected) / sigma)[pairs].abs()
        assert z.max().item() < 6.0 and int((z > 4.5).sum()) <= 14, (name, z.max().item(), int((z > 4.5).sum()))


def test_the_corners_of_a_rectangle_are_independent():
    p, t, n = 0.2, 1024, 4_000_000
    keep = dropout_keep_mask(torch.tensor([987654321, 123456789]), 1, 1, t, t, p)[0, 0]
    g = torch.Generator().manual_seed(0)
    r, c = torch.randint(t, (2, n), generator=g), torch.randint(t, (2, n), generator=g)
    ok = (r[0] != r[1]) & (c[0] != c[1])
    corners = keep[r[0], c[0]] & keep[r[0], c[1]] & keep[r[1], c[0]] & keep[r[1], c[1]]
    assert sigmas(corners[ok].float().mean().item(), (1 - p) ** 4, int(ok.sum())) < 4


def test_the_same_keys_give_the_same_mask_and_new_keys_another():
    rng = torch.tensor([5, 7])
    first = dropout_keep_mask(rng, 2, 3, 128, 128, 0.2)
    assert torch.equal(first, dropout_keep_mask(rng.clone(), 2, 3, 128, 128, 0.2))
    chance = 0.8**2 + 0.2**2
    for other in ([6, 7], [5, 8]):  # either key changes the mask, and the masks agree only by chance
        again = dropout_keep_mask(torch.tensor(other), 2, 3, 128, 128, 0.2)
        assert sigmas((again == first).float().mean().item(), chance, first.numel()) < 4
    heads = dropout_keep_mask(rng, 1, 64, 128, 128, 0.2).view(64, -1).float()  # neighbouring heads
    assert sigmas((heads[:-1] == heads[1:]).float().mean().item(), chance, heads[1:].numel()) < 4


def test_dropout_needs_as_many_queries_as_keys():
    with pytest.raises(ValueError, match="Tq == Tk, got Tq=3 Tk=5"):
        dropout_keep_mask(torch.tensor([1, 2]), 1, 1, 3, 5, 0.2)
