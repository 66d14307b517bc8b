"""The cuTile model's decode step: one new token per row against the KV cache, in five kernels per block.

Per block, on the rows (B, C) of the new tokens, in the matmuls' half dtype with the residual stream in the
weights' dtype (fp32 under autocast, the half dtype in a cast model), the reference's dataflow regrouped:

    qkv = LayerNorm_1(x) @ W_attn^T + b_attn                       decode_linear (LayerNorm inside)
    y   = attention(q over the cache and the new k, v)            decode_attention (writes k, v into the cache)
    x   = x + y @ W_proj^T + b_proj                                decode_linear (residual inside)
    g   = GELU(LayerNorm_2(x) @ W_fc^T + b_fc)                     decode_linear
    x   = x + g @ W_mproj^T + b_mproj                              decode_linear

then the logits of the tied head after ln_f (decode_linear). The embeddings' sum is PyTorch's. Prefill (the prompt
into an empty cache) is the fused forward (gptcore/fused_forward.py), which also fills the cache.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gptcore.fused_forward import half_weight


def decode_step(model, idx: torch.Tensor, kv_cache, dtype: torch.dtype) -> torch.Tensor:
    """Logits (B, 1, V) in `dtype` of the tokens idx (B, 1) at position kv_cache[0].length, whose keys and values
    join the cache."""
    from gptcore import half_weights
    from gptcore.kernels.decode_attention import decode_attention
    from gptcore.kernels.decode_linear import decode_linear

    config = model.config
    pos = kv_cache[0].length
    if pos >= config.block_size:
        raise ValueError(f"sequence of length {pos + 1} is longer than block_size {config.block_size}")
    if model.lm_head.weight.dtype != dtype:
        half_weights.current(model, dtype)  # the half copies, made or refreshed (eagerly) once
    tr = model.transformer
    autocast_off = torch.is_autocast_enabled(idx.device.type)
    with torch.autocast(idx.device.type, enabled=False) if autocast_off else contextlib.nullcontext():
        x = F.embedding(idx[:, 0], tr.wte.weight) + tr.wpe.weight[pos]
        for block, cache in zip(tr.h, kv_cache):
            attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
            qkv = decode_linear(x, half_weight(attn.c_attn, dtype), attn.c_attn.bias, ln_1.weight, ln_1.bias,
                                eps=ln_1.eps)  # fmt: skip
            y = decode_attention(qkv, cache.k, cache.v, pos, config.n_head)
            x = decode_linear(y, half_weight(attn.c_proj, dtype), attn.c_proj.bias, residual=x)
            g = decode_linear(x, half_weight(mlp.c_fc, dtype), mlp.c_fc.bias, ln_2.weight, ln_2.bias, eps=ln_2.eps,
                              gelu=True)  # fmt: skip
            x = decode_linear(g, half_weight(mlp.c_proj, dtype), mlp.c_proj.bias, residual=x)
            cache.length = pos + 1
        ln_f = tr.ln_f
        logits = decode_linear(x, half_weight(model.lm_head, dtype), None, ln_f.weight, ln_f.bias, eps=ln_f.eps)
    return logits[:, None, :]
