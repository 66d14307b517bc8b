"""The custom operators' plumbing, on a CPU: schemas, fake (meta) functions, the registered backward, and
the cuTile model under torch.compile(fullgraph=True) and torch.export. The cuTile kernels need a GPU, so
each op gets a CPU kernel here that computes its function with PyTorch, in the kernels' output layouts:
everything around the kernels (what torch.library, AOTAutograd and Dynamo see) is the real code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt

from gptcore.kernels import attention as A
from gptcore.kernels import layernorm as L
from gptcore.kernels.dropout import dropout_keep_mask, dropout_rng
from gptcore.model import GPT, GPTConfig, causal_attention_reference, causal_scores


def reference_attention(q, k, v, rng, scale, dropout_p):
    """(o, stats) as the forward kernel writes them: o laid out (B, T, H, D), stats = (row max of the raw
    scores, log2 of the row sum of exp2((s - max) * scale * log2(e)) = exp(scale * (s - max)))."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    s = causal_scores(q, k, scale)  # scaled
    m = s.amax(-1)
    log2_l = torch.log2(torch.exp(s - m[..., None]).sum(-1))
    keep = dropout_keep_mask(rng, b, h, tq, tk, dropout_p) if dropout_p > 0 else None
    o = causal_attention_reference(q, k, v, keep, dropout_p, scale)
    return A._bhtd_empty_like(q, tq).copy_(o), torch.stack([m / scale, log2_l])


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    @A.attention_fwd_op.register_kernel("cpu")
    def _(q, k, v, rng, scale, dropout_p):
        return reference_attention(q, k, v, rng, scale, dropout_p)

    @A.attention_bwd_op.register_kernel("cpu")
    def _(q, k, v, o, stats, do, rng, scale, dropout_p):
        # the gradients written out (a kernel runs below autograd, so none can be recorded here)
        b, h, t, _ = q.shape
        qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
        p = torch.softmax(causal_scores(qf, kf, scale), dim=-1)
        scale_keep = dropout_keep_mask(rng, b, h, t, t, dropout_p) / (1 - dropout_p) if dropout_p > 0 else 1.0
        dv = (p * scale_keep).transpose(-2, -1) @ dof
        dp = (dof @ vf.transpose(-2, -1)) * scale_keep
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        grads = (ds @ kf * scale, ds.transpose(-2, -1) @ qf * scale, dv)
        return tuple(A._bhtd_empty_like(x, t).copy_(g) for x, g in zip((q, k, v), grads))

    @L.layer_norm_fwd_op.register_kernel("cpu")
    def _(x, weight, bias, eps):
        x32 = x.float()
        mean, var = x32.mean(-1), x32.var(-1, unbiased=False)
        y = F.layer_norm(x32, (x.shape[-1],), weight, bias, eps).to(x.dtype)
        return y.contiguous(), torch.stack([mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)])

    @L.layer_norm_bwd_op.register_kernel("cpu")
    def _(x, weight, bias, stats, dy):
        n = x.shape[-1]
        mean, rstd = stats[0].view(*x.shape[:-1], 1), stats[1].view(*x.shape[:-1], 1)
        xhat = (x.float() - mean) * rstd
        wdy = dy.float() * (weight.float() if weight is not None else 1.0)
        dx = rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True))
        dw = (dy.float() * xhat).reshape(-1, n).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
        db = dy.float().reshape(-1, n).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
        return dx.to(dy.dtype).contiguous(), dw, db


@pytest.fixture
def cpu_allowed(monkeypatch):
    """The wrappers refuse CPU tensors (the kernels need a GPU); here the CPU kernels above stand in."""
    monkeypatch.setattr(A, "_check", lambda q, k, v: None)
    monkeypatch.setattr(L, "_check", lambda x, w, b: None)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_attention_ops_pass_opcheck(dropout_p):
    q, k, v = (torch.randn(2, 3, 20, 16, requires_grad=True) for _ in range(3))
    rng = dropout_rng(q.device) if dropout_p else None
    torch.library.opcheck(A.attention_fwd_op, (q, k, v, rng, 0.25, dropout_p))
    o, stats = A.attention_fwd_op(q.detach(), k.detach(), v.detach(), rng, 0.25, dropout_p)
    torch.library.opcheck(
        A.attention_bwd_op, (q.detach(), k.detach(), v.detach(), o, stats, torch.randn_like(o), rng, 0.25, dropout_p)
    )


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_ops_pass_opcheck(affine):
    x = torch.randn(3, 7, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True) if affine else None
    b = torch.randn(32, requires_grad=True) if affine else None
    torch.library.opcheck(L.layer_norm_fwd_op, (x, w, b, 1e-5))
    y, stats = L.layer_norm_fwd_op(x.detach(), w, b, 1e-5)
    params = [None if t is None else t.detach() for t in (w, b)]  # no double backward: a backward's inputs
    torch.library.opcheck(L.layer_norm_bwd_op, (x.detach(), *params, stats, torch.randn_like(y)))


def test_the_registered_backward_gives_the_references_gradients(cpu_allowed):
    q, k, v = (torch.randn(2, 3, 20, 16, requires_grad=True) for _ in range(3))
    rng = torch.tensor([12345, 67890])
    out = A.causal_attention(q, k, v, dropout_p=0.1, rng=rng)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    keep = dropout_keep_mask(rng, 2, 3, 20, 20, 0.1)
    ref = causal_attention_reference(*leaves, keep, 0.1)
    for g, r in zip(got, torch.autograd.grad(ref, leaves, do)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def tiny_cutile(dropout=0.0):
    return tiny_gpt("cutile", n_layer=2, dropout=dropout)


def test_cutile_model_traces_as_one_graph_and_compiles_fullgraph(cpu_allowed):
    model = tiny_cutile(dropout=0.2)
    x = torch.randint(40, (3, 16))
    y = torch.roll(x, -1, dims=1)
    explained = torch._dynamo.explain(model)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert [t for t in targets if "attention_fwd" in t] and [t for t in targets if "layer_norm_fwd" in t], targets
    # AOTAutograd through the registered backward, dropout included: the same loss and gradients as eager
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_loss = model(x, y)[1]
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(x, y)[1]
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_inference_model_exports(cpu_allowed):
    model = tiny_cutile().eval()
    x = torch.randint(40, (2, 16))
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("gptcore" in t and "layer_norm_fwd" in t for t in targets), targets
    assert any("gptcore" in t and "attention_fwd" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x)[0], model(x)[0])
    reference = GPT(model.config).eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x)[0], reference(x)[0], rtol=1e-4, atol=1e-4)  # the same function


@pytest.mark.parametrize("n_embd, n_head", [(48, 2), (256, 1), (32, 4)])  # head dims 24, 256, 8
def test_the_cutile_model_refuses_a_head_dim_its_attention_cannot_take_when_built(n_embd, n_head):
    from gptcore.cutile_model import CuTileGPT
    from gptcore.errors import ParamsError

    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=n_head, n_embd=n_embd)
    with pytest.raises(ParamsError, match=f"n_embd {n_embd} with n_head {n_head} .head dim {n_embd // n_head}.*16"):
        CuTileGPT(config)
