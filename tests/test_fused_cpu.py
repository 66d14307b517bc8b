"""The fused forward of the cuTile model (gptcore/fused_forward.py) and its new operators, on a CPU: each op's
schema, fake function and registered backward (torch.library.opcheck), the model's loss and every gradient
against the reference GPT under the same autocast, the half weight copies the optimizer keeps current, and
torch.compile with no graph break. The cuTile kernels need a GPU: their CPU stand-ins (tests/cpu_kernels.py)
compute each op's function, so what is tested here is everything around the kernels, as the model runs it.
The kernels themselves are checked against float64 on a GPU (tests/test_fused_gpu.py, verify's L1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cpu_kernels import allow_cpu, loss_and_grad_rows, register
from helpers import rel_err, tiny_gpt

from gptcore import half_weights
from gptcore.kernels import attention as A
from gptcore.kernels import bias_gelu as G
from gptcore.kernels import cross_entropy as CE
from gptcore.kernels import linear_cross_entropy as LCE
from gptcore.kernels import residual_layernorm as R
from gptcore.kernels.dropout import dropout_keep_mask, rows_keep_mask
from gptcore.model import GPT
from gptcore.verify.common import bias_gelu_reference, cross_entropy_reference, residual_layer_norm_reference

SIZES = dict(block_size=32, vocab_size=45, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    register()


@pytest.fixture(autouse=True)
def cpu_allowed(monkeypatch):
    allow_cpu(monkeypatch)


# ---- the operators ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_x, p", [(True, 0.0), (True, 0.2), (False, 0.2)])
def test_add_dropout_layer_norm_ops_pass_opcheck(has_x, p):
    branch = torch.randn(3, 7, 32, dtype=torch.bfloat16 if has_x else torch.float32, requires_grad=True)
    x = torch.randn(3, 7, 32, requires_grad=True) if has_x else None
    bb, w, b = (torch.randn(32, requires_grad=True) for _ in range(3))
    rng = torch.tensor([123, 456]) if p else None
    args = (x, branch, bb if has_x else None, w, b, rng, p, 1e-5, torch.bfloat16)
    torch.library.opcheck(R.adl_fwd_op, args)
    x_out, y, stats = R.adl_fwd_op(*[t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    bwd = (x_out, w.detach(), stats, rng, torch.randn_like(y), torch.randn_like(x_out), p, has_x, branch.dtype)
    torch.library.opcheck(R.adl_bwd_op, bwd)


def test_bias_gelu_and_cross_entropy_ops_pass_opcheck():
    u = torch.randn(5, 48, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    torch.library.opcheck(G.bias_gelu_fwd_op, (u, bias))
    torch.library.opcheck(G.bias_gelu_bwd_op, (u.detach(), bias.detach(), torch.randn_like(u)))
    logits = torch.randn(9, 45, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([0, 44, -1, 3, 3, 7, -1, 12, 1])
    torch.library.opcheck(CE.cross_entropy_fwd_op, (logits, targets, -1))
    loss, lse, count = CE.cross_entropy_fwd_op(logits.detach(), targets, -1)
    torch.library.opcheck(CE.cross_entropy_bwd_op, (logits.detach(), targets, lse, count, torch.tensor(0.5), -1))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_packed_attention_ops_pass_opcheck(p):
    qkv = torch.randn(2, 20, 3 * 32, dtype=torch.float32, requires_grad=True)
    rng = torch.tensor([12345, 67890]) if p else None
    torch.library.opcheck(A.attention_qkv_fwd_op, (qkv, rng, 2, 0.25, p))
    o, stats = A.attention_qkv_fwd_op(qkv.detach(), rng, 2, 0.25, p)
    torch.library.opcheck(A.attention_qkv_bwd_op, (qkv.detach(), o, stats, torch.randn_like(o), rng, 2, 0.25, p))


def test_packed_attention_is_attention_on_the_split_heads_with_a_packed_gradient():
    qkv = torch.randn(2, 20, 3 * 32, requires_grad=True)
    rng = torch.tensor([5, 6])
    y = A.causal_attention_qkv(qkv, 2, dropout_p=0.1, rng=rng)
    q, k, v = (t.detach().requires_grad_(True) for t in A.split_heads(qkv, 2))
    ref = A.causal_attention(q, k, v, dropout_p=0.1, rng=rng)
    torch.testing.assert_close(y, A.merge_heads(ref))
    dy = torch.randn_like(y)
    (dqkv,) = torch.autograd.grad(y, qkv, dy)
    grads = torch.autograd.grad(ref, (q, k, v), dy.view(2, 20, 2, 16).transpose(1, 2))
    torch.testing.assert_close(dqkv, torch.cat([g.transpose(1, 2).reshape(2, 20, 32) for g in grads], dim=2))


def test_the_fused_ops_gradients_are_their_references_gradients():
    """Through the registered backward: the residual LayerNorm (with dropout), bias + GELU and cross-entropy
    against their PyTorch references (the same masks), in fp32."""
    rng = torch.tensor([77, 88])
    leaves = [torch.randn(4, 6, 32, requires_grad=True) for _ in range(2)] + [
        torch.randn(32, requires_grad=True) for _ in range(3)
    ]
    x_out, y = R.add_dropout_layer_norm(*leaves, p=0.2, rng=rng)
    refs = [t.detach().requires_grad_(True) for t in leaves]
    ref_x, ref_y = residual_layer_norm_reference(*refs, p=0.2, rng=rng)
    torch.testing.assert_close((x_out, y), (ref_x, ref_y))
    upstream = (torch.randn_like(x_out), torch.randn_like(y))
    got = torch.autograd.grad((x_out, y), leaves, upstream)
    for g, r in zip(got, torch.autograd.grad((ref_x, ref_y), refs, upstream)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    u, bias = torch.randn(8, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    dg = torch.randn(8, 48)
    got = torch.autograd.grad(G.bias_gelu(u, bias), (u, bias), dg)
    refs = [u.detach().requires_grad_(True), bias.detach().requires_grad_(True)]
    for g, r in zip(got, torch.autograd.grad(bias_gelu_reference(*refs), refs, dg)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    logits = torch.randn(3, 5, 45, requires_grad=True)
    targets = torch.randint(45, (3, 5))
    targets[0, 2] = -1
    loss = CE.cross_entropy(logits, targets)
    ref_logits = logits.detach().requires_grad_(True)
    ref = cross_entropy_reference(ref_logits, targets)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, ref_logits)[0])


def test_the_kernels_erfc_is_erfc_to_fp32_precision():
    """Numerical Recipes' erfcc, the bias + GELU kernels' erfc: its coefficients as written give a fractional
    error under 1.2e-7 (a mistyped digit would not)."""
    z = torch.linspace(0, 9, 20001, dtype=torch.float64)
    rel = ((G.erfc_nonneg_reference(z) - torch.erfc(z)) / torch.erfc(z)).abs().max().item()
    assert rel < 1.2e-7


def test_the_rows_mask_is_the_attention_hash_with_rows_as_tokens():
    rng = torch.tensor([0x1234_5678_9ABC, 0x0FED_CBA9_8765])
    keep = rows_keep_mask(rng, 512, 384, 0.2)
    assert torch.equal(keep[:256, :256], dropout_keep_mask(rng, 1, 1, 256, 256, 0.2)[0, 0])
    rate = keep.float().mean().item()
    assert abs(rate - 0.8) / math.sqrt(0.8 * 0.2 / keep.numel()) < 4


# ---- the fused model ----------------------------------------------------------------------------------------


def models(dropout=0.0):
    cutile = tiny_gpt("cutile", 0, **SIZES, dropout=dropout)
    reference = GPT(cutile.config)
    reference.load_state_dict(cutile.state_dict())
    return cutile, reference


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(SIZES["vocab_size"], (3, SIZES["block_size"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    loss.backward()
    return logits, loss, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}


def test_the_fused_model_computes_the_reference_loss_and_every_gradient():
    """Eval mode (no dropout), bf16 autocast: the fused path's logits, loss and each parameter's gradient are the
    reference GPT's, to bf16 accuracy; the tied embedding gets both its gradients."""
    cutile, reference = models()
    cutile.eval(), reference.eval()
    x, y = batch()
    logits, loss, grads = loss_and_grads(cutile, x, y)
    ref_logits, ref_loss, ref_grads = loss_and_grads(reference, x, y)
    assert half_weights.dtype_of(cutile) == torch.bfloat16  # the fused path ran, on the half copies
    assert logits.dtype == torch.bfloat16 and logits.shape == ref_logits.shape
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    assert rel_err(logits.float(), ref_logits.float()) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert grads[name] is not None and grads[name].dtype == torch.float32, name
        assert rel_err(grads[name], g) < 5e-2, (name, rel_err(grads[name], g))


def test_the_fused_model_generates_from_the_last_position():
    cutile, reference = models()
    cutile.eval(), reference.eval()
    x, _ = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = cutile(x)
        ref_logits, _ = reference(x)
    assert loss is None and logits.shape == (3, 1, SIZES["vocab_size"])
    assert rel_err(logits.float(), ref_logits.float()) < 2e-2


def test_fp32_runs_take_the_module_path():
    cutile, _ = models()
    x, y = batch()
    cutile(x, y)
    assert half_weights.dtype_of(cutile) is None  # no half copies: the fused path never ran


def test_dropout_in_training_draws_from_the_generator_and_reaches_every_parameter():
    cutile, _ = models(dropout=0.2)
    x, y = batch()
    torch.manual_seed(5)
    _, train_loss, grads = loss_and_grads(cutile, x, y)
    torch.manual_seed(5)
    _, again, _ = loss_and_grads(cutile, x, y)
    _, other, _ = loss_and_grads(cutile, x, y)  # the generator moved on: other masks
    cutile.eval()
    _, eval_loss, _ = loss_and_grads(cutile, x, y)
    assert train_loss.item() == again.item() != other.item()
    assert train_loss.item() != eval_loss.item()
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_the_optimizer_keeps_the_half_copies_current_and_the_checkpoint_holds_fp32_weights():
    cutile, _ = models()
    optimizer = cutile.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    cutile.prepare_half_weights(torch.bfloat16)
    x, y = batch()
    loss_and_grads(cutile, x, y)
    optimizer.step()
    for linear, _ in half_weights.half_linears(cutile):
        assert torch.equal(linear.weight_half, linear.weight.detach().to(torch.bfloat16))
    assert not half_weights.stale(cutile)
    state = cutile.state_dict()
    assert not [k for k in state if "half" in k] and all(v.dtype == torch.float32 for v in state.values())
    # weights changed behind the optimizer's back: the next eager forward refreshes the copies first
    with torch.no_grad():
        cutile.lm_head.weight.mul_(2)
    assert half_weights.stale(cutile)
    loss_and_grads(cutile, x, y)
    assert torch.equal(cutile.lm_head.weight_half, cutile.lm_head.weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize("head_op, other_op", [("cross_entropy_fwd", "linear_cross_entropy_fwd"),
                                               ("linear_cross_entropy_fwd", "cross_entropy_fwd")])  # fmt: skip
def test_the_fused_model_compiles_with_no_graph_break_and_the_eager_gradients(head_op, other_op, request):
    """With the plain head (logits, then the cross-entropy op) and with the fused one (a vocabulary counted as
    large): one graph of the custom ops, and the eager path's loss and gradients."""
    if head_op == "linear_cross_entropy_fwd":
        request.getfixturevalue("fused_head")
    cutile, _ = models(dropout=0.0)
    cutile.eval()
    cutile.prepare_half_weights(torch.bfloat16)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(cutile)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    for op in ("add_dropout_layer_norm_fwd", "bias_gelu_fwd", head_op, "attention_qkv_fwd"):
        assert [t for t in targets if f"gptcore.{op}" in t], (op, targets)
    assert not [t for t in targets if f"gptcore.{other_op}" in t], targets
    compiled = torch.compile(cutile, fullgraph=True, backend="aot_eager")
    _, eager_loss, eager_grads = loss_and_grads(cutile, x, y)
    _, compiled_loss, compiled_grads = loss_and_grads(compiled, x, y)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-3, atol=1e-5)


def test_a_half_model_exports_its_fused_forward_as_the_custom_ops():
    """As load_for_inference casts it (bf16 weights, no autocast): torch.export keeps the fused ops, flat in the
    graph, and the exported program computes what the model does."""
    cutile, _ = models()
    cutile = cutile.to(torch.bfloat16).eval()
    x, _ = batch()
    exported = torch.export.export(cutile, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    for op in ("add_dropout_layer_norm_fwd", "attention_qkv_fwd", "bias_gelu_fwd"):
        assert any("gptcore" in t and op in t for t in targets), (op, targets)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x)[0], cutile(x)[0])


def test_the_eager_paths_give_the_operators_results(monkeypatch):
    """The eager autograd.Functions (what a plain CUDA run takes: the launch helpers without the operators'
    dispatch), their helpers routed to the CPU kernels: the values and gradients of the operators' path."""

    def adl_forward_rows(x, branch, bb, w, b, rng, *, p, eps, out_dtype):
        return R.adl_fwd_op(x, branch, bb, w, b, rng, p, eps, out_dtype)

    def adl_backward_rows(x_out, w, stats, rng, dy, dx_out, *, p, has_x, branch_dtype):
        dx, dbranch, sums = R.adl_bwd_op(x_out, w, stats, rng, dy, dx_out, p, has_x, branch_dtype)
        return (dx if has_x else None), dbranch, sums

    def ce_forward_rows(logits, targets, ignore_index):
        lse = torch.logsumexp(logits.float(), dim=-1)
        picked = logits.float().gather(1, targets.clamp(min=0)[:, None])[:, 0]
        return torch.where(targets != ignore_index, lse - picked, 0.0), lse

    def ce_backward_rows(logits, targets, lse, scale, ignore_index):
        onehot = torch.nn.functional.one_hot(targets.clamp(min=0), logits.shape[-1])
        d = (torch.exp(logits.float() - lse[:, None]) - onehot) * scale
        return torch.where((targets != ignore_index)[:, None], d, 0.0).to(logits.dtype)

    monkeypatch.setattr(R, "forward_rows", adl_forward_rows)
    monkeypatch.setattr(R, "backward_rows", adl_backward_rows)
    monkeypatch.setattr(G, "forward_rows", G.bias_gelu_fwd_op)
    monkeypatch.setattr(G, "backward_rows", G.bias_gelu_bwd_op)
    monkeypatch.setattr(CE, "forward_rows", ce_forward_rows)
    monkeypatch.setattr(CE, "backward_rows", ce_backward_rows)

    def run(direct: bool):
        for module in (R, G, CE):
            monkeypatch.setattr(module, "launches_directly", lambda *tensors, direct=direct: direct)
        torch.manual_seed(3)
        x, branch = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32, requires_grad=True)
        bb, w, b, gelu_bias = (torch.randn(n, requires_grad=True) for n in (32, 32, 32, 64))
        x_out, y = R.add_dropout_layer_norm(x, branch, bb, w, b, p=0.2, rng=torch.tensor([3, 4]))
        _, y_final = R.add_dropout_layer_norm(x_out, branch, bb, w, b)  # its x_out feeds nothing: no gradient
        g = G.bias_gelu(y_final.repeat(1, 1, 2), gelu_bias)
        targets = torch.tensor([[1, 2, -1, 3, 0], [4, 5, 6, -1, 7]])
        loss = CE.cross_entropy(g[..., :40], targets) + y.square().mean()
        return loss, torch.autograd.grad(loss, (x, branch, bb, w, b, gelu_bias))

    loss, grads = run(direct=True)
    ref_loss, ref_grads = run(direct=False)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


# ---- the fused LM head + cross-entropy (large vocabularies) ---------------------------------------------------


def head_inputs(m=11, c=32, vocab=50, seed=0):
    """bf16 hidden states, an fp32 head weight (as the model trains) and targets, some ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, c, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, c, generator=g) * 0.5).requires_grad_(True)
    targets = torch.randint(vocab, (m,), generator=g)
    targets[2::5] = -1
    return h, weight, targets


def test_linear_cross_entropy_op_passes_opcheck():
    h, weight, targets = head_inputs()
    args = (h, weight, weight.detach().to(torch.bfloat16), targets, -1, 4)
    torch.library.opcheck(LCE.linear_cross_entropy_fwd_op, args)


@pytest.mark.parametrize("rows", [4, 11, 64])
def test_linear_cross_entropy_is_the_reference_head_and_loss_in_any_chunks(rows):
    """Chunks of 4 rows (the last one ragged), exactly one chunk, a chunk larger than the rows: the loss and the
    gradients of h and of the fp32 weight are the reference formula's (F.linear in bf16, then F.cross_entropy in
    fp32) under a scaled incoming gradient, and ignored rows get none."""
    h, weight, targets = head_inputs()
    loss = LCE.linear_cross_entropy(h, weight, targets, rows=rows)
    (loss * 0.25).backward()
    ref_h, ref_w = h.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    ref = cross_entropy_reference(F.linear(ref_h, ref_w.to(torch.bfloat16)), targets)
    (ref * 0.25).backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    assert h.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert rel_err(h.grad, ref_h.grad) < 1e-2 and rel_err(weight.grad, ref_w.grad) < 1e-2
    assert torch.all(h.grad[targets == -1] == 0)


def test_linear_cross_entropy_chunks_by_the_logits_budget():
    assert LCE.chunk_rows(12288, 50304, 2) == 2560  # GPT-2 small's batch in five chunks, whole tiles of 128 rows
    assert LCE.chunk_rows(16384, 65, 2) == 16384  # a character vocabulary: one
    assert LCE.chunk_rows(1000, 2**21, 2) == 64  # under 128 rows: as many as fit
    assert LCE.chunk_rows(5, 2**40, 2) == 1


def test_the_eager_head_gives_the_operators_results(monkeypatch):
    """The eager autograd.Function (a plain CUDA run's path) with the kernel's CPU stand-in: the operator's values
    and gradients."""
    monkeypatch.setattr(LCE, "loss_and_grad_rows", loss_and_grad_rows)

    def run(direct: bool):
        monkeypatch.setattr(LCE, "launches_directly", lambda *tensors: direct)
        h, weight, targets = head_inputs()
        loss = LCE.linear_cross_entropy(h, weight, targets, rows=4)
        return loss, torch.autograd.grad(loss * 3, (h, weight))

    loss, grads = run(direct=True)
    ref_loss, ref_grads = run(direct=False)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.fixture
def fused_head(monkeypatch):
    """SIZES' vocabulary counted as large, and chunks of 40 rows: a batch of 3 x 32 rows runs in 3, the last
    ragged."""
    monkeypatch.setattr(LCE, "FUSED_MIN_VOCAB", SIZES["vocab_size"])
    monkeypatch.setattr(LCE, "LOGITS_CHUNK_BYTES", 40 * SIZES["vocab_size"] * 2)


def test_a_large_vocabulary_fuses_the_head_in_training_and_keeps_the_logits_without_gradients(fused_head):
    cutile, reference = models()
    cutile.eval(), reference.eval()
    x, y = batch()
    logits, loss, grads = loss_and_grads(cutile, x, y)
    _, ref_loss, ref_grads = loss_and_grads(reference, x, y)
    assert logits is None  # never made
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    for name, g in ref_grads.items():
        assert grads[name] is not None and grads[name].dtype == torch.float32, name
        assert rel_err(grads[name], g) < 5e-2, (name, rel_err(grads[name], g))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, eval_loss = cutile(x, y)
    assert logits.shape == (*x.shape, SIZES["vocab_size"])
    assert abs(eval_loss.item() - loss.item()) < 1e-3 * loss.item()
