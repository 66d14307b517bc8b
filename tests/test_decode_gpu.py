"""The decode step's cuTile kernels on a GPU: each against its float64 reference (every linear chain at both presets'
widths, 1 to 100 rows, GPT-2's LM head; attention over caches of 256 and 1024 positions at every kind of position,
with one split and several), the cache append, stale cache rows that must not leak, the custom operators under
opcheck; then the cuTile model's decode against the reference GPT's (logits at every step, greedy streams) and the
sampler's multi-token CUDA graphs against eager decoding. Skipped with the reason where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, tiny_gpt

from gptcore.kernels import decode_attention as DA
from gptcore.kernels import decode_linear as DL
from gptcore.sampling import Decoder
from gptcore.verify.common import decode_attention_reference, decode_linear_reference

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16


def randn(*shape, scale=1.0, mean=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + sum(shape))
    return (torch.randn(*shape, device="cuda", generator=g) * scale + mean).to(dtype)


def linear_inputs(variant, rows, c, dtype, stream_dtype, vocab=65):
    k, n = {"qkv": (c, 3 * c), "proj": (c, c), "fc": (c, 4 * c), "mproj": (4 * c, c), "head": (c, vocab)}[variant]
    has_ln = variant in ("qkv", "fc", "head")
    x = randn(rows, k, scale=2.0, mean=0.5, dtype=stream_dtype if has_ln else dtype)
    return dict(
        x=x,
        weight=randn(n, k, scale=k**-0.5, dtype=dtype, seed=1),
        bias=None if variant == "head" else randn(n, scale=0.5, dtype=stream_dtype, seed=2),
        ln_weight=randn(k, scale=0.5, mean=1.0, dtype=stream_dtype, seed=3) if has_ln else None,
        ln_bias=randn(k, scale=0.5, dtype=stream_dtype, seed=4) if has_ln else None,
        residual=randn(rows, n, scale=2.0, dtype=stream_dtype, seed=5) if variant in ("proj", "mproj") else None,
        gelu=variant == "fc",
    )


def float64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("variant", ["qkv", "proj", "fc", "mproj", "head"])
@pytest.mark.parametrize("c", [384, 768])
@pytest.mark.parametrize("rows", [1, 5, 64, 100])
@pytest.mark.parametrize("dtype, stream_dtype", [(BF16, BF16), (torch.float16, torch.float32)])
def test_decode_linear_matches_float64(variant, c, rows, dtype, stream_dtype):
    inputs = linear_inputs(variant, rows, c, dtype, stream_dtype)
    out = DL.decode_linear(**inputs)
    ref = decode_linear_reference(**float64(inputs))
    assert out.dtype == (stream_dtype if inputs["residual"] is not None else dtype) and out.shape == ref.shape
    # the candidate's output is rounded to its dtype (the float64 reference is not): a few units of rounding
    assert rel_err(out, ref) < (1e-2 if dtype == BF16 else 2e-3)


def test_decode_linear_gpt2_head_matches_float64():
    inputs = linear_inputs("head", 3, 768, BF16, BF16, vocab=50304)
    out = DL.decode_linear(**inputs)
    assert rel_err(out, decode_linear_reference(**float64(inputs))) < 1e-2


@pytest.mark.parametrize("heads, hd, length", [(6, 64, 256), (12, 64, 1024), (4, 32, 100)])
@pytest.mark.parametrize("pos_kind", ["first", "tile edge", "middle", "last"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_decode_attention_matches_float64_and_appends(heads, hd, length, pos_kind, batch):
    pos = {"first": 0, "tile edge": 64, "middle": length // 2 - 3, "last": length - 1}[pos_kind]
    qkv = randn(batch, 3 * heads * hd, dtype=BF16)
    k_cache, v_cache = randn(batch, heads, length, hd, dtype=BF16, seed=1), randn(batch, heads, length, hd, dtype=BF16)
    k_cache[:, :, pos + 1 :] = float("nan")  # stale rows past pos must not reach the output
    v_cache[:, :, pos + 1 :] = float("inf")
    k_ref, v_ref = k_cache.double(), v_cache.double()
    out = DA.decode_attention(qkv, k_cache, v_cache, pos, heads)
    ref = decode_attention_reference(qkv.double(), k_ref, v_ref, pos, heads)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2
    assert torch.equal(k_cache[:, :, pos], qkv.view(batch, 3, heads, hd)[:, 1])
    assert torch.equal(v_cache[:, :, pos], qkv.view(batch, 3, heads, hd)[:, 2])


def test_decode_attention_splits_agree_with_one_split():
    """The same query over 1024 cached keys, with the table's split plan (several splits at batch 1) and forced into
    one split: the combine step changes only rounding."""
    qkv = randn(1, 3 * 12 * 64, dtype=BF16)
    caches = [randn(1, 12, 1024, 64, dtype=BF16, seed=s) for s in (1, 2)]
    tiles = DA.tiles_for("sm_90")
    splits, _ = DA.split_plan(1000, 12, tiles, torch.cuda.get_device_properties(0).multi_processor_count)
    assert splits > 1
    many = DA._forward(qkv, *[c.clone() for c in caches], 1000, 12)
    one = DA._forward(qkv, *[c.clone() for c in caches], 1000, 12, tiles=DA.DecodeAttentionTiles(64, 10**6, 1, 4))
    assert rel_err(many, one) < 5e-3


def test_decode_ops_pass_opcheck():
    inputs = linear_inputs("fc", 3, 384, BF16, BF16)
    args = tuple(inputs[k] for k in ("x", "weight", "bias", "ln_weight", "ln_bias", "residual")) + (1e-5, True)
    torch.library.opcheck(DL.decode_linear_op, args)
    qkv = randn(2, 3 * 384, dtype=BF16)
    torch.library.opcheck(DA.decode_attention_op, (qkv, randn(2, 6, 256, 64, dtype=BF16), randn(2, 6, 256, 64), 9, 6))


# ---- the model ----------------------------------------------------------------------------------------------

SIZES = dict(block_size=64, vocab_size=65, n_layer=2, n_head=6, n_embd=384)


def models(**sizes):
    ref = tiny_gpt("torch", **sizes).cuda().to(BF16).eval()
    cand = tiny_gpt("cutile", **sizes).cuda().to(BF16).eval()
    cand.load_state_dict(ref.state_dict())
    return ref, cand


@pytest.mark.parametrize("batch", [1, 16])
def test_cutile_decode_steps_match_the_reference(batch):
    ref, cand = models(**SIZES)
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(65, (batch, SIZES["block_size"]), device="cuda", generator=g)
    caches = [m.new_kv_cache(batch) for m in (ref, cand)]
    with torch.no_grad():
        outs = [m(idx[:, :7], kv_cache=c)[0] for m, c in zip((ref, cand), caches)]
        assert rel_err(outs[1], outs[0]) < 2e-2  # prefill: the fused forward fills the cache
        for t in range(7, SIZES["block_size"]):
            a, b = (m(idx[:, t : t + 1], kv_cache=c)[0] for m, c in zip((ref, cand), caches))
            assert rel_err(b, a) < 2e-2, f"position {t}"
    for a, b in zip(*caches):
        assert rel_err(b.k, a.k) < 2e-2 and rel_err(b.v, a.v) < 2e-2


def test_multi_token_graphs_give_the_eager_tokens():
    """Sampling (temperature 0.8, top-k) with graphs of 8 steps: the very tokens of eager single steps, for prompt
    lengths that start off the graphs' boundaries, past the end of the block (the window slides) and again."""
    _, cand = models(**SIZES)
    for prompt_len in (1, 5, 13):
        prompt = torch.randint(65, (2, prompt_len), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        eager = Decoder(cand, 2, 0.8, 20, generator=torch.Generator("cuda").manual_seed(7))
        graphs = Decoder(cand, 2, 0.8, 20, generator=torch.Generator("cuda"), cuda_graph=True, tokens_per_graph=8)
        expected = eager.generate(prompt, 80)
        for _ in range(2):  # captured on the first run, replayed on the second
            graphs.generator.manual_seed(7)
            assert torch.equal(graphs.generate(prompt, 80), expected)
        assert graphs.graph_error is None and any(steps > 1 for _, _, steps in graphs.graphs)
