"""The custom operators' plumbing, on a CPU: schemas, fake (meta) functions, the registered backward, and
the cuTile model under torch.compile(fullgraph=True) and torch.export. The cuTile kernels need a GPU, so
each op gets a CPU kernel (tests/cpu_kernels.py) that computes its function with PyTorch, in the kernels'
output layouts: everything around the kernels (what torch.library, AOTAutograd and Dynamo see) is the real code."""

from __future__ import annotations

import pytest
import torch
from cpu_kernels import allow_cpu, register
from helpers import tiny_gpt

from gptcore.kernels import attention as A
from gptcore.kernels import layernorm as L
from gptcore.kernels.dropout import dropout_keep_mask, dropout_rng
from gptcore.model import GPT, GPTConfig, causal_attention_reference


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    register()


@pytest.fixture
def cpu_allowed(monkeypatch):
    """The wrappers refuse CPU tensors (the kernels need a GPU); here the CPU kernels stand in."""
    allow_cpu(monkeypatch)


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
