"""The cuTile model's fused forward: the reference GPT's function in a few fused kernels per sublayer.

Per block, in the matmuls' half dtype (bf16 under autocast) with the residual stream in the weights' dtype (fp32
in training), exactly the reference's dataflow (gptcore/model.py) regrouped:

    qkv = h @ W_attn^T + b_attn                 cuBLAS, the bias in its epilogue, W from the half copies
    y   = attention(qkv)                        cuTile flash attention on the packed qkv (dropout inside)
    x, h = x + dropout(y @ W_proj^T + b_proj), LayerNorm_2(x)        one cuTile kernel after a bias-free matmul
    g   = GELU(h @ W_fc^T + b_fc)               bias-free matmul, then bias + exact GELU in one cuTile kernel
    x, h = x + dropout(g @ W_mproj^T + b_mproj), LayerNorm_1 of the next block (ln_f after the last)

then the tied LM head and a cuTile cross-entropy; in training with a large vocabulary (GPT-2's), the head and
its cross-entropy in chunks of rows that never hold the logits whole (kernels/linear_cross_entropy.py), and the
forward returns no logits. The embeddings' sum goes through the first fused LayerNorm as
its branch (x_out = dropout(tok + pos)). Backward, each fused kernel produces its inputs' gradients and its
biases' and LayerNorm parameters' column sums itself, and the matmuls compute the fp32 weight gradients
straight from half inputs (no cast kernels). The half copies of the weights are gptcore/half_weights.py's.

The module path (gptcore/cutile_model.py's LayerNorm and attention classes) stays for decoding with a KV cache
and for fp32 runs; CuTileGPT.forward chooses (`fused_dtype`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gptcore import half_weights

HALF_DTYPES = (torch.bfloat16, torch.float16)


def fused_dtype(model, device_type: str) -> torch.dtype | None:
    """The half dtype the fused forward runs its matmuls in: autocast's when it is on for this device and half,
    else the weights' own when they are half; None (the module path) otherwise."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in HALF_DTYPES else None
    dtype = model.lm_head.weight.dtype
    return dtype if dtype in HALF_DTYPES else None


def _weight_grad(dy2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dy^T @ x in the weight's dtype: an fp32 weight's gradient comes out of cuBLAS in fp32 (its accumulator's
    precision) from the half operands, with no cast kernel after it."""
    if dtype == torch.float32 and dy2.is_cuda and dy2.dtype in HALF_DTYPES:
        return torch.mm(dy2.t(), x2, out_dtype=torch.float32)
    return (dy2.t() @ x2).to(dtype)


class HalfLinear(torch.autograd.Function):
    """x @ weight^T + bias computed from half copies of weight and bias, with the gradients going to weight and
    bias themselves (in their dtype). The copies are inputs without gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_half, bias_half):
        ctx.save_for_backward(x, weight_half)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight_half, bias_half)

    @staticmethod
    def backward(ctx, dy):
        x, weight_half = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight_half).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dy2, x.reshape(-1, x.shape[-1]), ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def _half_copy(module: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    """The module's half copy of its weight when there is one in `dtype` (half_weights.py), else None."""
    weight_half = getattr(module, half_weights.WEIGHT, None)
    return weight_half if weight_half is not None and weight_half.dtype == dtype else None


def half_weight(module: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """module.weight in `dtype` without a gradient of its own: the weight itself, its half copy, or a cast."""
    weight = module.weight
    if weight.dtype == dtype:
        return weight
    weight_half = _half_copy(module, dtype)
    return weight.detach().to(dtype) if weight_half is None else weight_half


def linear(x: torch.Tensor, module: torch.nn.Linear, dtype: torch.dtype, with_bias: bool = True) -> torch.Tensor:
    """module(x) in `dtype` from the weights' half copies (or the weights themselves when already in dtype); the
    bias only `with_bias`. Without copies (under torch.compile before `half_weights.prepare`), cast in the graph."""
    weight, bias = module.weight, module.bias if with_bias else None
    if weight.dtype == dtype:
        return F.linear(x, weight, bias)
    weight_half = _half_copy(module, dtype)
    if weight_half is None:
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    bias_half = None if bias is None else getattr(module, half_weights.BIAS)
    return HalfLinear.apply(x, weight, bias, weight_half, bias_half)


def fused_forward(model, idx: torch.Tensor, targets: torch.Tensor | None, dtype: torch.dtype, kv_cache=None):
    """The reference GPT.forward on the fused kernels, its matmuls in `dtype`: (logits, loss) with targets, else
    (the last position's logits, None). With gradients and a vocabulary of FUSED_MIN_VOCAB or more, (None, loss):
    the head and the loss are fused and the logits never made. With an empty `kv_cache` (prefill), the keys and
    values of every position are copied into it."""
    from gptcore.kernels.attention import causal_attention_qkv, split_heads
    from gptcore.kernels.bias_gelu import bias_gelu
    from gptcore.kernels.cross_entropy import cross_entropy
    from gptcore.kernels.linear_cross_entropy import FUSED_MIN_VOCAB, linear_cross_entropy
    from gptcore.kernels.residual_layernorm import add_dropout_layer_norm

    config = model.config
    t = idx.size(1)
    if kv_cache is not None and kv_cache[0].length != 0:
        raise ValueError(f"the fused forward fills an empty KV cache; this one holds {kv_cache[0].length} positions")
    if t > config.block_size:
        raise ValueError(f"sequence of length {t} is longer than block_size {config.block_size}")
    p = config.dropout if model.training else 0.0
    if model.lm_head.weight.dtype != dtype:
        half_weights.current(model, dtype)  # made or refreshed eagerly; under compile, used if there
    tr = model.transformer
    blocks = list(tr.h)
    norms = [block.ln_1 for block in blocks[1:]] + [tr.ln_f]  # the LayerNorm after each block: the next one's

    def add_norm(x, branch, branch_bias, ln):
        return add_dropout_layer_norm(x, branch, branch_bias, ln.weight, ln.bias, p=p, eps=ln.eps, out_dtype=dtype)

    # the dtypes are explicit from here on: autocast, when on, is switched off (a no-op context otherwise, so
    # an exported half model's graph stays flat)
    autocast_off = torch.is_autocast_enabled(idx.device.type)
    with torch.autocast(idx.device.type, enabled=False) if autocast_off else contextlib.nullcontext():
        emb = F.embedding(idx, tr.wte.weight) + tr.wpe.weight[:t]
        x, h = add_norm(None, emb, None, blocks[0].ln_1)
        for i, (block, next_norm) in enumerate(zip(blocks, norms)):
            attn, mlp = block.attn, block.mlp
            qkv = linear(h, attn.c_attn, dtype)
            if kv_cache is not None:
                _, k, v = split_heads(qkv, config.n_head)
                kv_cache[i].append(k, v)
            y = causal_attention_qkv(qkv, config.n_head, p)
            x, h = add_norm(x, linear(y, attn.c_proj, dtype, False), attn.c_proj.bias, block.ln_2)
            g = bias_gelu(linear(h, mlp.c_fc, dtype, False), mlp.c_fc.bias)
            x, h = add_norm(x, linear(g, mlp.c_proj, dtype, False), mlp.c_proj.bias, next_norm)
        if targets is None:
            return linear(h[:, -1:, :], model.lm_head, dtype), None
        head = model.lm_head
        if torch.is_grad_enabled() and head.weight.shape[0] >= FUSED_MIN_VOCAB:
            return None, linear_cross_entropy(h, head.weight, targets, half_weight(head, dtype), ignore_index=-1)
        logits = linear(h, head, dtype)
        return logits, cross_entropy(logits, targets, ignore_index=-1)
