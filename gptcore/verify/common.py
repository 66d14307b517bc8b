"""What the verification levels share: the candidate seam, the result record, the error measures.

The candidate is the pair of ops under test, LayerNorm and causal attention. By default they are the
cuTile kernels and the candidate model is `CuTileGPT` itself; a test passes PyTorch's ops (with noise
added, say) instead and runs every level on the CPU through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptcore.kernels.dropout import dropout_keep_mask
from gptcore.model import GPT, CausalSelfAttention, LayerNorm, causal_attention_reference

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


# ---- the PyTorch references of the fused ops -------------------------------------------------------------


def residual_layer_norm_reference(x, branch, branch_bias, weight, bias, *, p=0.0, eps=1e-5, out_dtype=None, rng=None):
    """x_out = x + dropout(branch + branch_bias) and y = LayerNorm(x_out) in PyTorch, with the kernels' own mask."""
    from gptcore.kernels.dropout import rows_keep_mask

    n = branch.shape[-1]
    v = branch if branch_bias is None else branch + branch_bias
    if p > 0:
        v = v * rows_keep_mask(rng, v.numel() // n, n, p).view(v.shape).to(v.device) / (1.0 - p)
    x_out = v if x is None else x + v
    return x_out, F.layer_norm(x_out, (n,), weight, bias, eps).to(out_dtype or branch.dtype)


def bias_gelu_reference(u, bias):
    """Exact GELU of u + bias in PyTorch, in u's dtype."""
    return F.gelu(u if bias is None else u + bias).to(u.dtype)


def cross_entropy_reference(logits, targets, ignore_index=-1):
    """F.cross_entropy over the rows of logits (upcast to fp32 unless float64), the mean over counted targets."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)


def decode_linear_reference(x, weight, bias=None, ln_weight=None, ln_bias=None, residual=None, eps=1e-5, gelu=False):
    """gptcore.kernels.decode_linear's function: [residual +] act(LayerNorm(x) @ weight^T + bias), rounded as the
    model rounds (the LayerNorm's and the matmul's outputs to the weight's dtype), in fp32 math (float64 for float64
    inputs)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    h = x.to(dt)
    if ln_weight is not None:
        h = F.layer_norm(h, (x.shape[-1],), ln_weight.to(dt), None if ln_bias is None else ln_bias.to(dt), eps)
    h = h.to(weight.dtype).to(dt) @ weight.to(dt).t()
    if bias is not None:
        h = h + bias.to(dt)
    h = h.to(weight.dtype).to(dt)
    if gelu:
        h = F.gelu(h).to(weight.dtype).to(dt)
    if residual is None:
        return h.to(weight.dtype)
    return (residual.to(dt) + h).to(residual.dtype)


def decode_attention_reference(qkv, k_cache, v_cache, pos: int, n_head: int):
    """gptcore.kernels.decode_attention's function: the new token's k and v (from the packed qkv (B, 3C)) written
    into the caches (B, H, L, hd) at `pos`, and its attention output (B, C) over positions 0..pos, in fp32 math
    (float64 for float64 inputs), in qkv's dtype."""
    b, c3 = qkv.shape
    dt = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = qkv.view(b, 3, n_head, c3 // (3 * n_head)).unbind(1)  # (B, H, hd) each
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    keys, values = k_cache[:, :, : pos + 1].to(dt), v_cache[:, :, : pos + 1].to(dt)
    scores = (keys @ q.to(dt)[..., None])[..., 0] / q.shape[-1] ** 0.5  # (B, H, pos + 1)
    out = (torch.softmax(scores, dim=-1)[..., None, :] @ values)[..., 0, :]
    return out.reshape(b, c3 // 3).to(qkv.dtype)


def linear_cross_entropy_reference(h, weight, targets, ignore_index=-1, rows=None):
    """The model's head and loss: F.linear in h's dtype (the weight cast to it, as autocast does), then
    cross_entropy_reference; over every row at once (`rows`, the kernels' chunking, is not used)."""
    return cross_entropy_reference(F.linear(h, weight.to(h.dtype)), targets, ignore_index)


# ---- the candidate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """The ops under test: `layer_norm(x, weight, bias, eps)` and causal `attention(q, k, v, dropout_p, rng)` on
    (B, H, T, D) tensors, and the fused forward's ops: `residual_layer_norm(x, branch, branch_bias, weight, bias,
    p=, eps=, out_dtype=, rng=)` (x + dropout(branch + branch_bias), then LayerNorm), `bias_gelu(u, bias)` and
    `cross_entropy(logits, targets)`, the fused LM head `linear_cross_entropy(h, weight, targets)`, and the decode
    step's `decode_linear(x, weight, bias, ln_weight, ln_bias, residual, eps, gelu)` and `decode_attention(qkv,
    k_cache, v_cache, pos, n_head)`; the last six default to their PyTorch references (a test double replaces only
    what it tests). Embeddings and matmuls are PyTorch's in both models (the decode step's matmuls are its
    kernels'), so any difference the levels find comes from these ops."""

    name: str
    layer_norm: Callable
    attention: Callable
    model_cls: type[GPT] | None = None  # the model built on these ops; None: one is made from them
    unavailable: str | None = None  # why the candidate cannot run here; its levels are skipped with it
    residual_layer_norm: Callable = residual_layer_norm_reference
    bias_gelu: Callable = bias_gelu_reference
    cross_entropy: Callable = cross_entropy_reference
    linear_cross_entropy: Callable = linear_cross_entropy_reference
    decode_linear: Callable = decode_linear_reference
    decode_attention: Callable = decode_attention_reference

    def model_class(self) -> type[GPT]:
        if self.model_cls is not None:
            return self.model_cls
        ops = self

        class CandidateLayerNorm(LayerNorm):
            def forward(self, x):
                return ops.layer_norm(x, self.weight, self.bias, self.eps)

        class CandidateAttention(CausalSelfAttention):
            def attend(self, q, k, v):
                return ops.attention(q, k, v)

        class CandidateGPT(GPT):
            layer_norm_cls = CandidateLayerNorm
            attention_cls = CandidateAttention

        return CandidateGPT


def cutile_candidate(device: torch.device) -> Candidate:
    """The real thing: the cuTile kernels, and CuTileGPT, the very class training and sampling use (so the
    levels verify that model, not a replica of it). Unavailable, with the reason, without a CUDA GPU."""
    from gptcore import kernels
    from gptcore.cutile_model import CuTileGPT

    reason = kernels.cutile_unavailable(device)
    if reason is not None:
        return Candidate("cutile", kernels.layer_norm, kernels.causal_attention, CuTileGPT, reason)
    from gptcore.kernels.bias_gelu import bias_gelu
    from gptcore.kernels.cross_entropy import cross_entropy
    from gptcore.kernels.decode_attention import decode_attention
    from gptcore.kernels.decode_linear import decode_linear
    from gptcore.kernels.linear_cross_entropy import linear_cross_entropy
    from gptcore.kernels.residual_layernorm import add_dropout_layer_norm

    return Candidate(
        "cutile",
        kernels.layer_norm,
        kernels.causal_attention,
        CuTileGPT,
        None,
        residual_layer_norm=add_dropout_layer_norm,
        bias_gelu=bias_gelu,
        cross_entropy=cross_entropy,
        linear_cross_entropy=linear_cross_entropy,
        decode_linear=decode_linear,
        decode_attention=decode_attention,
    )


def torch_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_attention(q, k, v, dropout_p: float = 0.0, rng=None):
    """The hand-written causal attention in fp32 math. Autocast is switched off inside, as it does not
    reach into a cuTile kernel either (under fp16 autocast its score matmul would come out fp16, where the
    -1e20 mask floor overflows). With dropout, the kernels' own mask for the keys `rng`."""
    keep = None
    if dropout_p > 0:
        b, h, tq, _ = q.shape
        keep = dropout_keep_mask(rng, b, h, tq, k.shape[2], dropout_p)
    with torch.autocast(q.device.type, enabled=False):
        return causal_attention_reference(q, k, v, keep, dropout_p)


def torch_candidate(name: str = "torch") -> Candidate:
    """PyTorch's functional ops as the candidate (the hand-written attention, not SDPA, so it is a second
    implementation): the base of the CPU test doubles."""
    return Candidate(name, torch_layer_norm, torch_attention)


# ---- results -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One level or check. `figures` are the headline numbers (metrics), `tolerance` the bounds applied,
    `rows` the report's table (one dict per row, keys = `columns`)."""

    name: str  # "L1" ... "L5", "compile"
    title: str
    status: str = PASS
    reason: str = ""
    figures: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, reason: str) -> None:
        self.status = FAIL
        self.reason = f"{self.reason}; {reason}" if self.reason else reason


def within(value: float, bound: float) -> bool:
    """value <= bound, and False for NaN: a NaN figure never passes."""
    return value <= bound


def at_least(value: float, bound: float) -> bool:
    return value >= bound


# ---- error measures ----------------------------------------------------------------------------------------


def scaled_max(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """max|cand - ref| / max(1, max|ref|): relative for large values, absolute for small ones (an all-zero
    reference gradient must come out as ~0 and not be divided by 0). NaN anywhere gives NaN."""
    ref, cand = ref.double(), cand.double()
    diff = (cand - ref).abs().max().item()
    return diff / max(1.0, ref.abs().max().item())


def scaled_mean(ref: torch.Tensor, cand: torch.Tensor) -> float:
    ref, cand = ref.double(), cand.double()
    return (cand - ref).abs().mean().item() / max(1.0, ref.abs().mean().item())


def abs_diff(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |cand - ref|, in float64."""
    d = (cand.double() - ref.double()).abs()
    return d.max().item(), d.mean().item()
