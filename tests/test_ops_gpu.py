"""The cuTile kernels as PyTorch custom operators (gptcore::*): torch.library.opcheck passes for each, the
cuTile model compiles with fullgraph=True (no graph break) and trains compiled as it trains eagerly, and
the inference model exports. Attention dropout runs inside the flash kernels: the forward and gradients
match a float32 reference that applies the kernels' own mask, the mask keeps 1 - p of the probabilities,
and it follows the CUDA RNG state (same state, same mask; every CUDA-graph replay a new one).
Skipped with the reason where there is no CUDA GPU (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err, tiny_gpt

from gptcore.kernels.dropout import dropout_keep_mask, dropout_rng
from gptcore.model import causal_attention_reference

pytestmark = pytest.mark.gpu


def attn_inputs(b=2, h=3, t=64, d=64, dtype=torch.bfloat16, seed=0, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, t, d, device="cuda", generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


# ---- torch.library.opcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_attention_ops_pass_opcheck(dropout_p):
    from gptcore.kernels import attention as A

    q, k, v = attn_inputs(t=80, grad=True)
    rng = dropout_rng(q.device) if dropout_p else None
    torch.library.opcheck(A.attention_fwd_op, (q, k, v, rng, 0.125, dropout_p))
    o, stats = A.attention_fwd_op(q.detach(), k.detach(), v.detach(), rng, 0.125, dropout_p)
    do = torch.randn_like(o)
    torch.library.opcheck(
        A.attention_bwd_op,
        (q.detach(), k.detach(), v.detach(), o, stats, do, rng, 0.125, dropout_p),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_ops_pass_opcheck(affine):
    from gptcore.kernels import layernorm as L

    x = torch.randn(3, 37, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(384, device="cuda")).requires_grad_(True) if affine else None
    b = (0.1 * torch.randn(384, device="cuda")).requires_grad_(True) if affine else None
    torch.library.opcheck(L.layer_norm_fwd_op, (x, w, b, 1e-5))
    y, stats = L.layer_norm_fwd_op(x.detach(), w, b, 1e-5)
    params = [None if t is None else t.detach() for t in (w, b)]  # no double backward: a backward's inputs
    torch.library.opcheck(
        L.layer_norm_bwd_op,
        (x.detach(), *params, stats, torch.randn_like(y)),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# ---- the model under torch.compile and torch.export -----------------------------------------------------


SIZES = dict(block_size=64, vocab_size=71, n_layer=2, n_head=4, n_embd=128)


def tiny_cutile(dropout=0.0, seed=0):
    return tiny_gpt("cutile", seed, **SIZES, dropout=dropout).cuda()


def test_cutile_model_compiles_with_no_graph_break():
    model = tiny_cutile()
    x = torch.randint(71, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_training_step_matches_eager():
    """fullgraph=True forward, backward through the compiled graph: the same loss and gradients as eager."""
    eager = tiny_cutile()
    compiled_model = tiny_cutile()
    compiled_model.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_model, fullgraph=True)
    x = torch.randint(71, (4, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for fn in (eager, step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fn(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=2e-3, msg=name)


def test_inference_model_exports():
    model = tiny_cutile().to(torch.bfloat16).eval()  # as load_for_inference casts it: the attention runs bf16
    x = torch.randint(71, (2, 64), device="cuda")
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x)[0], model(x)[0], rtol=0, atol=0)  # the same kernels
    targets = {str(node.target) for node in exported.graph.nodes}  # the custom ops, not a trace
    for op in ("add_dropout_layer_norm_fwd", "attention_qkv_fwd", "bias_gelu_fwd"):  # the fused forward's
        assert any("gptcore" in t and op in t for t in targets), (op, targets)


# ---- attention dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.1, 0.2])
@pytest.mark.parametrize("t", [13, 64, 257])
def test_dropout_forward_and_gradients_match_the_reference_with_the_kernels_mask(t, dropout_p):
    from gptcore.kernels.attention import causal_attention

    q, k, v = attn_inputs(t=t, seed=t, grad=True)
    rng = dropout_rng(q.device)
    out = causal_attention(q, k, v, dropout_p=dropout_p, rng=rng)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    keep = dropout_keep_mask(rng, 2, 3, t, t, dropout_p)
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = causal_attention_reference(qr, kr, vr, keep, dropout_p)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do.float())

    assert rel_err(out, ref) < 2e-2  # bf16 output and P
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, r) < 4e-2, name
    without = causal_attention(q.detach(), k.detach(), v.detach())
    assert rel_err(without, ref) > 0.05  # the mask did change the result


def test_dropout_keeps_one_minus_p_and_is_the_reference_mask():
    """q = 0 makes every visible probability of row i 1/(i+1); v the identity puts probability j of row i in
    output column j: the output shows the kernel's mask itself, over ~1.06e7 draws."""
    from gptcore.kernels.attention import causal_attention

    p, b, h, t = 0.2, 64, 20, 128
    q = torch.zeros(b, h, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, t, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.eye(t, device="cuda", dtype=torch.bfloat16).expand(b, h, t, t).contiguous()
    rng = dropout_rng(q.device)
    with torch.no_grad():
        out = causal_attention(q, k, v, dropout_p=p, rng=rng)
    kept = out > 0
    causal = torch.ones(t, t, device="cuda", dtype=torch.bool).tril()
    assert not kept[..., ~causal].any()  # nothing above the diagonal
    assert torch.equal(kept & causal, dropout_keep_mask(rng, b, h, t, t, p) & causal)
    draws = int(causal.sum()) * b * h
    rate = kept.sum().item() / draws
    sigma = math.sqrt(p * (1 - p) / draws)
    assert abs(rate - (1 - p)) < 4 * sigma, (rate, draws)


def test_dropout_follows_the_cuda_rng_state_and_each_graph_replay_draws_anew():
    from gptcore.kernels.attention import causal_attention

    q, k, v = attn_inputs(t=128)

    def call():
        return causal_attention(q, k, v, dropout_p=0.2)

    torch.cuda.manual_seed(5)
    first = call()
    torch.cuda.manual_seed(5)
    assert torch.equal(call(), first)  # the same state, the same mask
    assert not torch.equal(call(), first)  # the state moved on

    static = torch.empty_like(first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.copy_(call())  # compiled, warmed up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(call())
    outputs = []
    for _ in range(3):
        graph.replay()
        outputs.append(static.clone())
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_cutile_model_trains_with_dropout_like_the_reference():
    """Same weights and batch, dropout 0.2 in training mode: the cuTile and reference losses differ only by
    their (different) dropout masks; with dropout off they agree closely."""
    ref, cut = tiny_gpt("torch", **SIZES, dropout=0.2).cuda(), tiny_gpt("cutile", **SIZES, dropout=0.2).cuda()
    cut.load_state_dict(ref.state_dict())
    x = torch.randint(71, (16, 64), device="cuda")
    y = torch.roll(x, -1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [[m(x, y)[1].item() for _ in range(8)] for m in (ref.train(), cut.train())]
        evals = [m.eval()(x, y)[1].item() for m in (ref, cut)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-2)
    mean = [sum(ls) / len(ls) for ls in losses]
    assert mean[0] == pytest.approx(mean[1], rel=2e-2)  # dropout of the same strength
    assert len(set(losses[1])) == len(losses[1])  # a new mask every call
