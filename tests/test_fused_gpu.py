"""The fused forward's cuTile kernels on a GPU: each against its float64 reference (forward and every gradient,
odd lengths and both presets' widths, with the kernels' own dropout mask), the mask itself against its PyTorch
copy, the custom operators under opcheck, and the fused cuTile model against the reference GPT: the same loss
and gradients, graph capture with the half weight copies kept current by the optimizer.
Skipped with the reason where there is no CUDA GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, tiny_gpt

from gptcore import half_weights
from gptcore.cuda_graphs import capture
from gptcore.kernels.dropout import rows_keep_mask
from gptcore.model import GPT
from gptcore.verify.common import bias_gelu_reference, cross_entropy_reference, residual_layer_norm_reference

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16


def randn(*shape, scale=1.0, mean=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + sum(shape))
    return (torch.randn(*shape, device="cuda", generator=g) * scale + mean).to(dtype)


def grads_of(outputs, inputs, upstream):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, leaves, upstream)


# ---- the kernels against float64 --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["block", "embedding", "final"])
@pytest.mark.parametrize("n", [384, 768])
@pytest.mark.parametrize("t", [1, 13, 257])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_residual_layer_norm_forward_and_gradients_match_float64(variant, n, t, p):
    from gptcore.kernels.residual_layernorm import add_dropout_layer_norm

    rng = torch.tensor([0x1234_5678_9ABC, 0x0FED_CBA9_8765], device="cuda") if p else None
    x = None if variant == "embedding" else randn(2, t, n, scale=2.0).requires_grad_(True)
    branch = randn(2, t, n, dtype=torch.float32 if variant == "embedding" else BF16, seed=1).requires_grad_(True)
    bb = None if variant == "embedding" else randn(n, scale=0.5, seed=2).requires_grad_(True)
    w, b = randn(n, scale=0.5, mean=1.0, seed=3).requires_grad_(True), randn(n, scale=0.5, seed=4).requires_grad_(True)
    inputs = (x, branch, bb, w, b)
    x_out, y = add_dropout_layer_norm(*inputs, p=p, out_dtype=BF16, rng=rng)
    refs = [None if v is None else v.detach().double().requires_grad_(True) for v in inputs]
    ref_x, ref_y = residual_layer_norm_reference(*refs, p=p, rng=rng)
    assert x_out.dtype == torch.float32 and y.dtype == BF16
    assert rel_err(x_out, ref_x) < 1e-6 and rel_err(y, ref_y) < 1e-2
    dy = randn(2, t, n, dtype=BF16, seed=5)
    if variant == "final":  # x_out feeds nothing: no residual gradient reaches the backward
        got, ref = grads_of(y, inputs, dy), grads_of(ref_y, refs, dy.double())
    else:
        dx_out = randn(2, t, n, seed=6)
        got = grads_of((x_out, y), inputs, (dx_out, dy))
        ref = grads_of((ref_x, ref_y), refs, (dx_out.double(), dy.double()))
    names = [name for name, v in zip(("x", "branch", "branch_bias", "weight", "bias"), inputs) if v is not None]
    for name, g, r in zip(names, got, ref):
        bound = 1e-2 if g.dtype == BF16 else 1e-4  # the branch gradient is stored in bf16
        assert rel_err(g, r) < bound, (name, rel_err(g, r))


def test_residual_dropout_is_the_reference_mask_and_keeps_one_minus_p():
    from gptcore.kernels.residual_layernorm import add_dropout_layer_norm

    rng = torch.tensor([987654321, 123456789], device="cuda")
    m, n, p = 16384 + 3, 384, 0.2
    ones = torch.ones(m, n, device="cuda")
    x_out, _ = add_dropout_layer_norm(None, ones, None, None, None, p=p, rng=rng)
    kept = x_out != 0
    assert torch.equal(kept, rows_keep_mask(rng, m, n, p))
    assert torch.all(x_out[kept] == 1 / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p)) / kept.numel()) ** 0.5


@pytest.mark.parametrize("f", [1536, 3072])
@pytest.mark.parametrize("rows", [1, 26, 16387])
def test_bias_gelu_forward_and_gradients_match_float64(f, rows):
    from gptcore.kernels.bias_gelu import bias_gelu

    u = randn(rows, f, scale=2.0, dtype=BF16).requires_grad_(True)
    bias = randn(f, scale=0.5, seed=1).requires_grad_(True)
    g = bias_gelu(u, bias)
    refs = [u.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)]
    ref = bias_gelu_reference(*refs)
    assert g.dtype == BF16 and rel_err(g, ref) < 1e-2
    dg = randn(rows, f, dtype=BF16, seed=2)
    (du, dbias), (ref_du, ref_dbias) = grads_of(g, (u, bias), dg), grads_of(ref, refs, dg.double())
    assert rel_err(du, ref_du) < 1e-2 and rel_err(dbias, ref_dbias) < 1e-3


@pytest.mark.parametrize("vocab", [65, 50304])
@pytest.mark.parametrize("t", [1, 13, 257])
def test_cross_entropy_and_its_gradient_match_float64(vocab, t):
    from gptcore.kernels.cross_entropy import cross_entropy

    logits = randn(2, t, vocab, scale=3.0, dtype=BF16).requires_grad_(True)
    targets = torch.randint(vocab, (2, t), device="cuda")
    targets[:, 2::5] = -1
    loss = cross_entropy(logits, targets)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = cross_entropy_reference(ref_logits, targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    (grad,), (ref_grad,) = grads_of(loss * 3, (logits,), None), grads_of(ref * 3, (ref_logits,), None)
    assert grad.dtype == BF16 and rel_err(grad, ref_grad) < 1e-2
    assert torch.all(grad.view(-1, vocab)[targets.view(-1) == -1] == 0)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_packed_attention_is_the_split_attention_with_one_packed_gradient(p):
    from gptcore.kernels import attention as A

    qkv = randn(2, 257, 3 * 384, dtype=BF16).requires_grad_(True)
    rng = torch.tensor([11, 22], device="cuda") if p else None
    y = A.causal_attention_qkv(qkv, 6, dropout_p=p, rng=rng)
    q, k, v = (t.detach().requires_grad_(True) for t in A.split_heads(qkv, 6))
    ref = A.merge_heads(A.causal_attention(q, k, v, dropout_p=p, rng=rng))
    assert torch.equal(y, ref)  # the same kernels
    dy = randn(2, 257, 384, dtype=BF16, seed=1)
    (dqkv,), grads = grads_of(y, (qkv,), dy), grads_of(ref, (q, k, v), dy)
    assert torch.equal(dqkv, torch.cat([A.merge_heads(g) for g in grads], dim=2))


def test_fused_ops_pass_opcheck():
    from gptcore.kernels import bias_gelu as G
    from gptcore.kernels import cross_entropy as CE
    from gptcore.kernels import residual_layernorm as R

    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    x, branch = randn(3, 37, 384).requires_grad_(True), randn(3, 37, 384, dtype=BF16).requires_grad_(True)
    bb, w, b = (randn(384, seed=s).requires_grad_(True) for s in (1, 2, 3))
    rng = torch.tensor([5, 6], device="cuda")
    torch.library.opcheck(R.adl_fwd_op, (x, branch, bb, w, b, rng, 0.2, 1e-5, BF16))
    x_out, y, stats = R.adl_fwd_op(
        x.detach(), branch.detach(), bb.detach(), w.detach(), b.detach(), rng, 0.2, 1e-5, BF16
    )
    bwd = (x_out, w.detach(), stats, rng, torch.randn_like(y), torch.randn_like(x_out), 0.2, True, BF16)
    torch.library.opcheck(R.adl_bwd_op, bwd, test_utils=utils)
    u = randn(50, 1536, dtype=BF16).requires_grad_(True)
    torch.library.opcheck(G.bias_gelu_fwd_op, (u, randn(1536).requires_grad_(True)))
    torch.library.opcheck(G.bias_gelu_bwd_op, (u.detach(), randn(1536), torch.randn_like(u)), test_utils=utils)
    logits, targets = randn(70, 65, dtype=BF16).requires_grad_(True), torch.randint(65, (70,), device="cuda")
    torch.library.opcheck(CE.cross_entropy_fwd_op, (logits, targets, -1))
    _, lse, count = CE.cross_entropy_fwd_op(logits.detach(), targets, -1)
    grad = torch.tensor(0.5, device="cuda")
    torch.library.opcheck(CE.cross_entropy_bwd_op, (logits.detach(), targets, lse, count, grad, -1), test_utils=utils)


# ---- the fused model ------------------------------------------------------------------------------------------

SIZES = dict(block_size=128, vocab_size=65, n_layer=2, n_head=6, n_embd=384)


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=BF16):
        _, loss = model(x, y)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def assert_reference_loss_and_gradients(sizes: dict, x: torch.Tensor) -> None:
    """The fused cuTile model (eval mode) and the reference GPT on the same weights and batch: the same loss, and
    every parameter's gradient to bf16 accuracy."""
    cutile = tiny_gpt("cutile", 0, **sizes).cuda().eval()
    reference = GPT(cutile.config).cuda().eval()
    reference.load_state_dict(cutile.state_dict())
    y = torch.roll(x, -1, dims=1)
    loss, grads = loss_and_grads(cutile, x, y)
    ref_loss, ref_grads = loss_and_grads(reference, x, y)
    assert half_weights.dtype_of(cutile) == BF16  # the fused path ran
    assert abs(loss.item() - ref_loss.item()) < 5e-3 * ref_loss.item()
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 3e-2, (name, rel_err(grads[name], g))


def test_the_fused_model_gives_the_reference_loss_and_gradients():
    assert_reference_loss_and_gradients(SIZES, torch.randint(65, (8, 128), device="cuda"))


def test_a_captured_training_step_keeps_the_half_copies_current():
    """Replays of a graphed step (forward, backward, AdamW and the copies' refresh in one graph) move the
    weights, and the copies follow them exactly."""
    from gptcore.train_step import make_train_step

    model = tiny_gpt("cutile", 0, **{**SIZES, "dropout": 0.2}).cuda()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cuda", capturable=True)
    step = make_train_step(
        model, optimizer, mode="graph", dtype=BF16, micro_steps=1, batch_size=8, block_size=128, grad_clip=1.0
    )
    x = torch.randint(65, (1, 8, 128), device="cuda")
    losses = [step.step(x, torch.roll(x, -1, dims=2), 1e-3).item() for _ in range(8)]
    assert step.captured and losses[-1] < losses[0]
    for linear, _ in half_weights.half_linears(model):
        assert torch.equal(linear.weight_half, linear.weight.detach().to(BF16))


def test_the_fused_forward_replays_in_a_graph_with_new_dropout_masks():
    model = tiny_gpt("cutile", 0, **{**SIZES, "dropout": 0.2}).cuda()
    model.prepare_half_weights(BF16)
    x = torch.randint(65, (4, 128), device="cuda")
    out = torch.zeros((), device="cuda")

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=BF16, cache_enabled=False):
            out.copy_(model(x, x)[1])

    graph = capture(forward, torch.cuda.Stream(), warmup=2)
    seen = set()
    for _ in range(3):
        graph.replay()
        seen.add(out.item())
    assert len(seen) == 3  # each replay draws new keys, so new masks


# ---- the fused LM head + cross-entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [65, 50304])
@pytest.mark.parametrize("t", [13, 257])
@pytest.mark.parametrize("rows", [200, None])
def test_linear_cross_entropy_and_its_gradients_match_float64(vocab, t, rows):
    """In chunks of 200 rows (several, the last one ragged) and in the default chunks: the loss and the gradients of
    the bf16 hidden states and of the fp32 weight against float64 on the same inputs, ignored rows without any."""
    from gptcore.kernels.linear_cross_entropy import linear_cross_entropy
    from gptcore.verify.common import linear_cross_entropy_reference

    h = randn(2, t, 768, dtype=BF16).requires_grad_(True)
    weight = randn(vocab, 768, scale=0.5, seed=1).requires_grad_(True)
    targets = torch.randint(vocab, (2, t), device="cuda")
    targets[:, 2::5] = -1
    loss = linear_cross_entropy(h, weight, targets, rows=rows)
    ref_h, ref_w = h.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = linear_cross_entropy_reference(ref_h, ref_w, targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-3 * ref.item()
    (dh, dw), (ref_dh, ref_dw) = grads_of(loss * 3, (h, weight), None), grads_of(ref * 3, (ref_h, ref_w), None)
    assert dh.dtype == BF16 and dw.dtype == torch.float32
    assert rel_err(dh, ref_dh) < 2e-2 and rel_err(dw, ref_dw) < 2e-2, (rel_err(dh, ref_dh), rel_err(dw, ref_dw))
    assert torch.all(dh.view(-1, 768)[targets.view(-1) == -1] == 0)


def test_linear_cross_entropy_op_passes_opcheck():
    from gptcore.kernels import linear_cross_entropy as LCE

    h, weight = randn(300, 768, dtype=BF16).requires_grad_(True), randn(4096, 768, seed=1).requires_grad_(True)
    targets = torch.randint(4096, (300,), device="cuda")
    torch.library.opcheck(LCE.linear_cross_entropy_fwd_op, (h, weight, weight.detach().to(BF16), targets, -1, 128))


def test_a_large_vocabulary_model_trains_as_one_graph_on_the_fused_head(monkeypatch):
    """GPT-2's vocabulary in chunks of 256 rows: the fused model's loss and gradients are the reference's, and a
    graphed step (forward, the head's chunks, backward, AdamW) lowers the loss."""
    from gptcore.kernels import linear_cross_entropy as LCE
    from gptcore.train_step import make_train_step

    monkeypatch.setattr(LCE, "LOGITS_CHUNK_BYTES", 256 * 50304 * 2)
    sizes = {**SIZES, "vocab_size": 50304}
    x = torch.randint(50304, (6, 128), device="cuda")
    assert_reference_loss_and_gradients(sizes, x)
    model = tiny_gpt("cutile", 0, **sizes).cuda()  # fresh: no eager autograd graph may hold its parameters
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cuda", capturable=True)
    step = make_train_step(
        model, optimizer, mode="graph", dtype=BF16, micro_steps=2, batch_size=3, block_size=128, grad_clip=1.0
    )
    xs = x.view(2, 3, 128)
    losses = [step.step(xs, torch.roll(xs, -1, dims=2), 1e-3).item() for _ in range(8)]
    assert step.captured and losses[-1] < losses[0]
