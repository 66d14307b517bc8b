"""L1 kernel tests: each cuTile kernel against the PyTorch functional reference in float32.

Forward outputs and every gradient, over the sequence lengths, head dims, widths and dtypes the
model uses, plus extreme inputs (fp16 scores of ~1e4, a query with one visible key). Skipped with the
reason where there is no CUDA GPU (tests/conftest.py).

Error measure: helpers.rel_err, relative L2 with a floor (an exactly-zero reference gradient at T = 1 is
compared in absolute terms); the reference attention is the model's own (causal_attention_reference). Tolerances per
dtype sit next to each assertion; they are a few times the rounding of the output dtype (bf16 keeps 8
bits: ~4e-3 relative per element; fp16 11 bits: ~5e-4), never looser than that needs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from gptcore.model import causal_attention_reference, causal_scores
from gptcore.verify.common import scaled_max

pytestmark = pytest.mark.gpu


def assert_finite(*ts):
    for t in ts:
        assert t is not None and torch.isfinite(t).all(), "non-finite values in a cuTile result"


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def attention_reference(q, k, v, scale=None):
    """The model's written-out attention in fp32 (finite mask floor, bottom-right alignment), and the
    log-sum-exp of its scaled, masked scores."""
    q, k, v = q.float(), k.float(), v.float()
    return causal_attention_reference(q, k, v, scale=scale), torch.logsumexp(causal_scores(q, k, scale), dim=-1)


# Relative-L2 tolerances: output rounding (bf16 ~4e-3, fp16 ~5e-4) plus P rounded to the input dtype
# before P @ V; gradients add the rounding of dS and two more products.
ATTN_TOL = {torch.bfloat16: {"out": 2e-2, "grad": 4e-2}, torch.float16: {"out": 5e-3, "grad": 1e-2}}


def _attn_case(b, h, t, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, t, d, device="cuda", generator=gen).to(dtype) for _ in range(4))
    return q, k, v, do


def _check_attention(q, k, v, do, dtype, scale=None):
    from gptcore.kernels import causal_attention

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = causal_attention(qg, kg, vg, scale)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    assert_finite(out, dq, dk, dv)
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref, _ = attention_reference(qr, kr, vr, scale)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), do.float())
    tol = ATTN_TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < tol["out"], f"out {rel_err(out, ref):.2e}"  # bf16 2e-2, fp16 5e-3
    for name, g, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel_err(g, r) < tol["grad"], f"{name} {rel_err(g, r):.2e}"  # bf16 4e-2, fp16 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 13, 64, 127, 256, 257, 1024])
def test_attention_forward_backward(t, d, dtype):
    q, k, v, do = _attn_case(2, 3, t, d, dtype, seed=t * 1000 + d)
    _check_attention(q, k, v, do, dtype)


@pytest.mark.parametrize("d", [16, 48, 80, 96, 112])
@pytest.mark.parametrize("t", [13, 257])
def test_attention_head_dims_padded_to_a_power_of_two(t, d):
    """Head dims that are multiples of 16 but not powers of two run on the next power-of-two tile, the
    padding loaded as zeros and never stored; 16 is the smallest the matrix units take."""
    q, k, v, do = _attn_case(2, 3, t, d, torch.bfloat16, seed=t * 1000 + d)
    _check_attention(q, k, v, do, torch.bfloat16)


def test_attention_lse_matches_logsumexp():
    from gptcore.kernels.attention import attention_forward, logsumexp

    q, k, v, _ = _attn_case(2, 3, 257, 64, torch.bfloat16, seed=7)
    out, stats = attention_forward(q, k, v, scale=1 / 8)
    ref, ref_lse = attention_reference(q, k, v)
    assert stats.dtype == torch.float32 and stats.shape == (2, 2, 3, 257)
    lse = logsumexp(stats, 1 / 8)
    assert (lse - ref_lse).abs().max().item() < 1e-4  # fp32 row max + log2 sum: absolute 1e-4 (nats)


def test_attention_saturated_fp16_key_gradient():
    """Scores ~1e4 in fp16 (every row's softmax on one key): the key gradient, the ill-conditioned one,
    within 2x the error of PyTorch's own fused attention on the same inputs, against float64."""
    from gptcore.kernels import causal_attention

    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k = (100 * torch.randn(2, 12, 256, 64, device="cuda", generator=gen) for _ in range(2))
    v, do = (torch.randn(2, 12, 256, 64, device="cuda", generator=gen) for _ in range(2))
    q, k, v, do = (x.half() for x in (q, k, v, do))

    def key_grad(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).backward(do.to(dtype))
        return leaves[1].grad.double()

    ref = key_grad(causal_attention_reference, torch.float64)  # computed in float64 on float64 inputs
    ours = scaled_max(ref, key_grad(causal_attention, torch.float16))  # the L1 measure
    sdpa = scaled_max(ref, key_grad(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), torch.float16))
    assert ours <= max(2 * sdpa, 1e-3), f"dK error {ours:.4g} vs SDPA {sdpa:.4g}"


def test_attention_model_layout():
    """q, k, v as the model makes them: transposed views of one (B, T, 3C) tensor, not contiguous."""
    b, t, h, d = 2, 256, 6, 64
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(b, t, 3 * h * d, device="cuda", generator=gen).to(dtype)
    q, k, v = (x.view(b, t, h, d).transpose(1, 2) for x in qkv.split(h * d, dim=2))
    assert not q.is_contiguous()
    do = torch.randn(b, h, t, d, device="cuda", generator=gen).to(dtype)
    _check_attention(q, k, v, do, dtype)


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 13), (1, 300), (7, 64), (13, 257), (64, 200)])
def test_attention_kv_cache_offset(tq, tk):
    """Tq < Tk (decoding against a cache): query i attends keys j <= i + Tk - Tq. Forward only."""
    from gptcore.kernels import causal_attention

    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(tq * 7 + tk)
    q = torch.randn(2, 3, tq, 64, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(2, 3, tk, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    with torch.no_grad():
        out = causal_attention(q, k, v)
    ref, _ = attention_reference(q, k, v)
    assert_finite(out)
    assert rel_err(out, ref) < 2e-2  # bf16 output: 2e-2


def test_attention_many_heads_grid_fallback():
    """B*H above the grid's y limit (65535) switches to the other block order; results unchanged."""
    q, k, v, do = _attn_case(70000, 1, 13, 32, torch.bfloat16, seed=70000)
    _check_attention(q, k, v, do, torch.bfloat16)


def test_attention_backward_needs_equal_lengths():
    from gptcore.kernels import causal_attention

    q = torch.randn(1, 2, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 9, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="Tq == Tk"):
        causal_attention(q, k, k)


def test_attention_rejects_fp32():
    from gptcore.kernels import causal_attention

    q = torch.randn(1, 2, 8, 64, device="cuda")
    with pytest.raises(TypeError, match="bf16 and fp16"):
        causal_attention(q, q, q)


@pytest.mark.parametrize("t", [1, 127, 257])
def test_attention_extreme_scores_fp16(t):
    """Scores of magnitude ~1e4 in fp16: softmax is one-hot-like; nothing may turn inf or NaN."""
    dtype = torch.float16
    gen = torch.Generator(device="cuda").manual_seed(11 + t)
    q = (40 * torch.randn(2, 3, t, 64, device="cuda", generator=gen)).to(dtype)
    k = (40 * torch.randn(2, 3, t, 64, device="cuda", generator=gen)).to(dtype)
    v = torch.randn(2, 3, t, 64, device="cuda", generator=gen).to(dtype)
    do = torch.randn(2, 3, t, 64, device="cuda", generator=gen).to(dtype)
    from gptcore.kernels import causal_attention

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = causal_attention(qg, kg, vg, 1.0)  # scale 1: |scores| ~ 40*40*8 ~ 1e4
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    assert_finite(out, *grads)
    ref, _ = attention_reference(q, k, v, 1.0)
    s = (q.float() @ k.float().transpose(-2, -1)).abs().max().item()
    assert s > 5e3, f"test inputs should reach scores ~1e4, got {s:.0f}"
    # fp16 output of an almost one-hot softmax: relative 5e-3 (as any fp16 output)
    assert rel_err(out, ref) < 5e-3
    # dv = P^T dO compares like any fp16 gradient (1e-2). dq and dk are P * (dP - delta) times keys
    # of size ~40: differences of nearly equal numbers, so only their finiteness is asserted (above).
    vr = v.float().requires_grad_(True)
    (rv,) = torch.autograd.grad(attention_reference(q.float(), k.float(), vr, 1.0)[0], (vr,), do.float())
    assert rel_err(grads[2], rv) < 1e-2


def test_attention_single_visible_key():
    """T = 1 (and the first row of any sequence) sees exactly one key: the output is that value row."""
    from gptcore.kernels import causal_attention

    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(4, 2, 1, 64, device="cuda").to(dtype) * 30  # |score| ~ 30*30*8 ~ 1e4
        k = torch.randn(4, 2, 1, 64, device="cuda").to(dtype) * 30
        v = torch.randn(4, 2, 1, 64, device="cuda").to(dtype)
        with torch.no_grad():
            out = causal_attention(q, k, v, 1.0)
        assert_finite(out)
        # Softmax over one key is 1, but p = exp2(s*c - round(s*c)) differs from 1 by the fp32 rounding
        # of the scaled score (~4e-4 at |s| ~ 1e4): within one output ulp (bf16 rtol 1e-2, fp16 2e-3).
        torch.testing.assert_close(out, v, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------------
# Relative-L2 tolerances: fp32 math throughout, so only the output rounding counts (and for fp32, the
# summation order of the per-block partial sums of dweight/dbias).
LN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _check_layer_norm(shape, dtype, affine, seed):
    from gptcore.kernels import layer_norm

    n = shape[-1]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (2 * torch.randn(*shape, device="cuda", generator=gen) + 0.5).to(dtype)
    dy = torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    w = (1 + 0.5 * torch.randn(n, device="cuda", generator=gen)).to(dtype) if affine in ("wb", "w") else None
    b = (0.5 * torch.randn(n, device="cuda", generator=gen)).to(dtype) if affine in ("wb", "b") else None
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = layer_norm(leaves[0], leaves[1], leaves[2], 1e-5)
    wants = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wants, dy)
    refs = [t.detach().float().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y_ref = F.layer_norm(refs[0], (n,), refs[1], refs[2], 1e-5)
    ref_grads = torch.autograd.grad(y_ref, [t for t in refs if t is not None], dy.float())
    tol = LN_TOL[dtype]
    assert_finite(y, *grads)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < tol, f"y {rel_err(y, y_ref):.2e}"  # fp32 1e-5, bf16 1e-2, fp16 2e-3
    for name, g, r, leaf in zip(("dx", "dw", "db"), grads, ref_grads, wants):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert rel_err(g, r) < tol, f"{name} {rel_err(g, r):.2e}"  # fp32 1e-5, bf16 1e-2, fp16 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [384, 768, 100, 1000, 1600])
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_layer_norm(n, dtype, affine):
    """Widths: 384 and 768, the presets' (three unpadded forward chunks each); 100 and 1000, not powers of
    two (one padded chunk; four, the last padded); 1600 (GPT-2 XL), wider than the tables' 1024."""
    _check_layer_norm((3, 37, n), dtype, affine, seed=n)


@pytest.mark.parametrize("affine", ["w", "b"])
def test_layer_norm_weight_or_bias_only(affine):
    _check_layer_norm((5, 13, 384), torch.bfloat16, affine, seed=5)


@pytest.mark.parametrize("n", [384, 768])
def test_layer_norm_many_rows(n):
    """The benchmark size: 16384 rows, so the persistent backward grid loops over many row tiles."""
    _check_layer_norm((16384, n), torch.bfloat16, "wb", seed=1)


def test_layer_norm_fp32_weight_bf16_input():
    """Mixed dtypes (bf16 activations, fp32 parameters): output in x's dtype, grads in each leaf's."""
    _check_layer_norm_mixed()


def _check_layer_norm_mixed():
    from gptcore.kernels import layer_norm

    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(64, 384, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
    w = (1 + 0.5 * torch.randn(384, device="cuda", generator=gen)).requires_grad_(True)
    b = (0.5 * torch.randn(384, device="cuda", generator=gen)).requires_grad_(True)
    dy = torch.randn(64, 384, device="cuda", generator=gen).to(torch.bfloat16)
    y = layer_norm(x, w, b)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    xr = x.detach().float().requires_grad_(True)
    wr, br = (t.detach().clone().requires_grad_(True) for t in (w, b))
    yr = F.layer_norm(xr, (384,), wr, br, 1e-5)
    rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gx.dtype == torch.bfloat16
    assert rel_err(y, yr) < 1e-2 and rel_err(gx, rx) < 1e-2  # bf16 outputs: 1e-2
    assert rel_err(gw, rw) < 1e-5 and rel_err(gb, rb) < 1e-5  # fp32 parameter grads: 1e-5


def test_layer_norm_constant_rows():
    """A row with zero variance: rstd = 1/sqrt(eps), output = bias, no inf/NaN."""
    from gptcore.kernels import layer_norm

    x = torch.full((8, 384), 3.0, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer_norm(x, w, b)
    grads = torch.autograd.grad(y.float().sum(), (x, w, b))
    assert_finite(y, *grads)
    torch.testing.assert_close(y, b.detach().expand(8, 384), rtol=0, atol=0)  # exact: xhat = 0


def test_kernels_raise_without_cuda_tensors():
    from gptcore.kernels import causal_attention, layer_norm

    with pytest.raises(RuntimeError, match="CUDA"):
        layer_norm(torch.randn(4, 8), None, None)
    with pytest.raises(RuntimeError, match="CUDA"):
        q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
        causal_attention(q, q, q)
