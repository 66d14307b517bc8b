"""The reference GPT: GPT-2 architecture with nanoGPT semantics, in plain PyTorch.

This is the source of truth that the cuTile model (gptcore/cutile_model.py) is verified against.
Parameter names follow karpathy/nanoGPT's model.py, so its `ckpt.pt` files load here
(gptcore.checkpoint.gpt_from_checkpoint) and a state dict moves unchanged between this model and the
cuTile one. Generation lives in gptcore/sampling.py.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcore.params import check_heads

# Masked attention scores get this finite floor instead of -inf: in fp32 math exp(-1e20 - max) is
# exactly 0, and a row whose keys are all masked still normalises to finite values instead of NaN.
MASK_FLOOR = -1e20


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        check_heads(self.n_embd, self.n_head)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, args: dict) -> GPTConfig:
        """Build from a checkpoint's `model_args`, naming missing or unknown keys."""
        names = {f.name for f in fields(cls)}
        required = names - {"dropout", "bias"}
        missing = sorted(required - set(args))
        unknown = sorted(set(args) - names)
        if missing:
            raise ValueError(f"model config is incomplete: missing {', '.join(missing)}")
        if unknown:
            raise ValueError(f"model config has unknown keys: {', '.join(unknown)}")
        return cls(**args)

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (`bias: false` in the config drops every bias, as in nanoGPT)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The scaled scores q @ k^T (1 / sqrt(D) unless `scale`), with the causal mask's finite floor, in fp32 or
    float64 (never half precision, where the -1e20 floor becomes -inf).

    q is (B, H, Tq, D), k is (B, H, Tk, D) with Tq <= Tk: query i sits at position i + Tk - Tq, so a query
    block that continues a cached prefix sees the whole prefix (bottom-right alignment)."""
    tq, tk = q.size(-2), k.size(-2)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = q.to(dtype) @ k.to(dtype).transpose(-2, -1)
        scores = scores / math.sqrt(q.size(-1)) if scale is None else scores * scale
        rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        cols = torch.arange(tk, device=q.device)[None, :]
        return scores.masked_fill(cols > rows, MASK_FLOOR)


def causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention written out (`causal_scores`, softmax, @ v) in fp32, or float64 for float64 inputs,
    returned in q's dtype: the model's own attention where SDPA's alignment does not fit, and the reference
    the kernels are verified against. `keep` (B, H, Tq, Tk): a dropout mask on the probabilities, the kept
    ones scaled by 1 / (1 - dropout_p)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        probs = torch.softmax(causal_scores(q, k, scale), dim=-1)
        if keep is not None:
            probs = probs * keep / (1.0 - dropout_p)
        return (probs @ v.to(probs.dtype)).to(q.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, Tq, D) queries against (B, H, Tk, D) keys/values, causal, Tq <= Tk."""
        dropout_p = self.dropout if self.training else 0.0
        tq, tk = q.size(-2), k.size(-2)
        if tq == tk or tq == 1:
            # SDPA's is_causal aligns the mask top-left; a single query at the end sees every key anyway.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=tq == tk and tq > 1)
        # A block of queries continuing a cached prefix needs the mask aligned bottom-right: written out.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        cols = torch.arange(tk, device=q.device)[None, :]
        scores = scores.float().masked_fill(cols > rows, MASK_FLOOR)
        att = self.attn_dropout(torch.softmax(scores, dim=-1).to(v.dtype))
        return att @ v

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU, as GPT-2 in nanoGPT
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block. The LayerNorm and attention classes are parameters so the
    cuTile model swaps in its kernels while every parameter keeps its name."""

    def __init__(self, config: GPTConfig, layer_norm_cls=LayerNorm, attention_cls=CausalSelfAttention):
        super().__init__()
        self.ln_1 = layer_norm_cls(config.n_embd, bias=config.bias)
        self.attn = attention_cls(config)
        self.ln_2 = layer_norm_cls(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class LayerKVCache:
    """Keys and values of one layer for incremental decoding, in preallocated (static) buffers so a
    decode step can be captured in a CUDA graph. `length` counts the positions filled so far."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: {end} positions, the cache holds {self.k.size(2)}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class GPT(nn.Module):
    layer_norm_cls = LayerNorm
    attention_cls = CausalSelfAttention

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, self.layer_norm_cls, self.attention_cls) for _ in range(config.n_layer)),
                ln_f=self.layer_norm_cls(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one tensor serves as the input embedding and the output projection.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: each block adds two residual branches.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: list[LayerKVCache] | None = None
    ):
        """Logits for every position when `targets` is given (with the cross-entropy loss), otherwise
        for the last position only (all that generation needs). With `kv_cache`, `idx` continues the
        cached prefix and positions count on from it."""
        B, T = idx.size()
        start = kv_cache[0].length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache[i] if kv_cache is not None else None)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
            return logits, loss
        # A slice, not nanoGPT's x[:, [-1], :]: an index list is copied from the host, which a CUDA
        # graph capture of the decode step (gptcore/sampling.py) does not allow.
        return self.lm_head(x[:, -1:, :]), None

    def crop_block_size(self, block_size: int):
        """Shrink the context window (for example to load GPT-2 weights into a smaller block)."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        capturable: bool = False,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices (2-D and up) and none on biases and LayerNorm gains.

        `capturable`: for a step captured in a CUDA graph (gptcore/train_graph.py): fused and capturable,
        with the learning rate a CUDA tensor that the graph reads, so it can change between replays."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if capturable:
            if device_type != "cuda" or params[0].device.type != "cuda":
                raise ValueError(
                    f"a capturable optimizer needs the parameters on a CUDA device, not on {params[0].device}"
                )
            lr = torch.tensor(learning_rate, dtype=torch.float32, device=params[0].device)
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True, capturable=True)
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def new_kv_cache(self, batch: int, device=None, dtype=None) -> list[LayerKVCache]:
        c = self.config
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        return [
            LayerKVCache(batch, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype) for _ in range(c.n_layer)
        ]
