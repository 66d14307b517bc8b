"""CPU kernels for the gptcore:: custom operators, so everything around the cuTile kernels (schemas, fake
functions, the registered backward, the fused forward's plumbing, torch.compile and torch.export) runs on a CPU.

Each computes its op's function with PyTorch in the kernels' output layouts and dtypes. A kernel runs below
autograd, so the backward ops are written out, not taken from autograd. `register()` installs them (once) and
`allow_cpu(monkeypatch)` lifts the wrappers' refusal of CPU tensors.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gptcore.kernels import attention as A
from gptcore.kernels import bias_gelu as G
from gptcore.kernels import cross_entropy as CE
from gptcore.kernels import decode_attention as DA
from gptcore.kernels import decode_linear as DL
from gptcore.kernels import layernorm as L
from gptcore.kernels import linear_cross_entropy as LCE
from gptcore.kernels import residual_layernorm as R
from gptcore.kernels.dropout import dropout_keep_mask, rows_keep_mask
from gptcore.model import causal_attention_reference, causal_scores
from gptcore.verify.common import (
    bias_gelu_reference,
    decode_attention_reference,
    decode_linear_reference,
    residual_layer_norm_reference,
)


def attention_forward(q, k, v, rng, scale, dropout_p):
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


def attention_grads(q, k, v, do, rng, scale, dropout_p):
    """(dq, dk, dv) in fp32, written out."""
    b, h, t, _ = q.shape
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = torch.softmax(causal_scores(qf, kf, scale), dim=-1)
    scale_keep = dropout_keep_mask(rng, b, h, t, t, dropout_p) / (1 - dropout_p) if dropout_p > 0 else 1.0
    dv = (p * scale_keep).transpose(-2, -1) @ dof
    dp = (dof @ vf.transpose(-2, -1)) * scale_keep
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return ds @ kf * scale, ds.transpose(-2, -1) @ qf * scale, dv


def layer_norm_stats(x, eps):
    x32 = x.float()
    mean, var = x32.mean(-1), x32.var(-1, unbiased=False)
    return torch.stack([mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)])


def layer_norm_dx(x, weight, stats, dy):
    """LayerNorm's input gradient (fp32) and xhat, from the saved statistics."""
    mean, rstd = stats[0].view(*x.shape[:-1], 1), stats[1].view(*x.shape[:-1], 1)
    xhat = (x.float() - mean) * rstd
    wdy = dy.float() * (weight.float() if weight is not None else 1.0)
    dx = rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True))
    return dx, xhat


def _keep(rng, shape, p):
    """The fused kernels' mask on an activation of `shape`, its rows counted over every leading dimension."""
    return rows_keep_mask(rng, math.prod(shape[:-1]), shape[-1], p).view(shape)


def loss_and_grad_rows(logits, targets, loss, ignore_index):
    """The LM head's loss-and-gradient kernel on one chunk: the rows' losses into `loss`, the logits overwritten
    by softmax - onehot(target) (0 on ignored rows)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = targets != ignore_index
    picked = lf.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    loss.copy_(torch.where(valid, lse - picked, 0.0))
    onehot = F.one_hot(targets.clamp(min=0), logits.shape[-1]).float()
    logits.copy_(torch.where(valid[:, None], torch.exp(lf - lse[:, None]) - onehot, 0.0))


@functools.cache
def register() -> None:
    @A.attention_fwd_op.register_kernel("cpu")
    def _(q, k, v, rng, scale, dropout_p):
        return attention_forward(q, k, v, rng, scale, dropout_p)

    @A.attention_bwd_op.register_kernel("cpu")
    def _(q, k, v, o, stats, do, rng, scale, dropout_p):
        grads = attention_grads(q, k, v, do, rng, scale, dropout_p)
        return tuple(A._bhtd_empty_like(x, q.shape[2]).copy_(g) for x, g in zip((q, k, v), grads))

    @A.attention_qkv_fwd_op.register_kernel("cpu")
    def _(qkv, rng, n_head, scale, dropout_p):
        return attention_forward(*A.split_heads(qkv, n_head), rng, scale, dropout_p)

    @A.attention_qkv_bwd_op.register_kernel("cpu")
    def _(qkv, o, stats, do, rng, n_head, scale, dropout_p):
        dqkv = torch.empty_like(qkv)
        grads = attention_grads(*A.split_heads(qkv, n_head), do, rng, scale, dropout_p)
        for view, g in zip(A.split_heads(dqkv, n_head), grads):
            view.copy_(g)
        return dqkv

    @L.layer_norm_fwd_op.register_kernel("cpu")
    def _(x, weight, bias, eps):
        y = F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps).to(x.dtype)
        return y.contiguous(), layer_norm_stats(x, eps)

    @L.layer_norm_bwd_op.register_kernel("cpu")
    def _(x, weight, bias, stats, dy):
        n = x.shape[-1]
        dx, xhat = layer_norm_dx(x, weight, stats, dy)
        dw = (dy.float() * xhat).reshape(-1, n).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
        db = dy.float().reshape(-1, n).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
        return dx.to(dy.dtype).contiguous(), dw, db

    @R.adl_fwd_op.register_kernel("cpu")
    def _(x, branch, branch_bias, weight, bias, rng, p, eps, out_dtype):
        def fp32(t):
            return None if t is None else t.float()

        inputs = (fp32(t) for t in (x, branch, branch_bias, weight, bias))
        x_out, y = residual_layer_norm_reference(*inputs, p=p, eps=eps, out_dtype=out_dtype, rng=rng)
        x_out = x_out.to(branch.dtype if x is None else x.dtype)
        return x_out.clone(memory_format=torch.contiguous_format), y.contiguous(), layer_norm_stats(x_out, eps)

    @R.adl_bwd_op.register_kernel("cpu")
    def _(x_out, weight, stats, rng, dy, dx_out, p, has_x, branch_dtype):
        n = x_out.shape[-1]
        dres, xhat = layer_norm_dx(x_out, weight, stats, dy)
        if dx_out is not None:
            dres = dres + dx_out.float()
        dbranch = dres * _keep(rng, dres.shape, p) / (1 - p) if p > 0 else dres
        sums = torch.stack([(dy.float() * xhat).reshape(-1, n).sum(0), dy.float().reshape(-1, n).sum(0)])
        sums = torch.cat([sums, dbranch.reshape(-1, n).sum(0)[None]])
        dx = dres.to(x_out.dtype).clone() if has_x else x_out.new_empty(0)
        return dx, dbranch.to(branch_dtype).clone(), sums

    @G.bias_gelu_fwd_op.register_kernel("cpu")
    def _(u, bias):
        return bias_gelu_reference(u.float(), None if bias is None else bias.float()).to(u.dtype).contiguous()

    @G.bias_gelu_bwd_op.register_kernel("cpu")
    def _(u, bias, dg):
        x = u.float() if bias is None else u.float() + bias.float()
        cdf = 0.5 * (1 + torch.erf(x / 2**0.5))
        du = dg.float() * (cdf + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5)
        return du.to(u.dtype).contiguous(), du.reshape(-1, u.shape[-1]).sum(0)

    @CE.cross_entropy_fwd_op.register_kernel("cpu")
    def _(logits, targets, ignore_index):
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=-1)
        count = (targets != ignore_index).sum().float()
        loss = F.cross_entropy(lf, targets, ignore_index=ignore_index, reduction="sum") / count
        return loss, lse, count

    @CE.cross_entropy_bwd_op.register_kernel("cpu")
    def _(logits, targets, lse, count, grad, ignore_index):
        valid = targets != ignore_index
        onehot = F.one_hot(targets.clamp(min=0), logits.shape[-1]).float()
        d = (torch.exp(logits.float() - lse[:, None]) - onehot) * (grad.float() / count)
        return torch.where(valid[:, None], d, 0.0).to(logits.dtype).contiguous()

    @LCE.linear_cross_entropy_fwd_op.register_kernel("cpu")
    def _(h, weight, weight_half, targets, ignore_index, rows):
        # the op's own host code (chunks, matmuls, fp32 gradients) around the stand-in of its kernel
        return LCE._forward(h, weight_half, targets, ignore_index, rows, grad_rows=loss_and_grad_rows)

    @DL.decode_linear_op.register_kernel("cpu")
    def _(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu):
        return decode_linear_reference(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu)

    @DA.decode_attention_op.register_kernel("cpu")
    def _(qkv, k_cache, v_cache, pos, n_head):
        return decode_attention_reference(qkv, k_cache, v_cache, pos, n_head)


def allow_cpu(monkeypatch) -> None:
    """The wrappers refuse CPU tensors (the kernels need a GPU); with `register()`'s kernels they may take them."""
    monkeypatch.setattr(A, "_check", lambda q, k, v: None)
    monkeypatch.setattr(L, "_check", lambda x, w, b: None)
    monkeypatch.setattr(R, "_check", lambda *args: None)
    monkeypatch.setattr(G, "_check", lambda u, bias: None)
    monkeypatch.setattr(CE, "_check", lambda logits, targets: None)
    monkeypatch.setattr(LCE, "_check", lambda *args: None)
    real_linear_check, real_attention_check = DL._check, DA._check
    monkeypatch.setattr(DL, "_check", lambda *args: _on_cpu(real_linear_check, *args))
    monkeypatch.setattr(DA, "_check", lambda *args: _on_cpu(real_attention_check, *args))


def _on_cpu(check, *args) -> None:
    """A wrapper's argument checks, less its refusal of CPU tensors."""
    try:
        check(*args)
    except RuntimeError as e:
        if "needs CUDA tensors" not in str(e):
            raise
