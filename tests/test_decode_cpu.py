"""The cuTile model's decode path (gptcore/decode_forward.py: prefill through the fused forward, then one token per
row in five kernels per block) on a CPU: the decode operators' schemas and fake functions (opcheck), their argument
checks, the attention's split plan, and the model's logits and KV cache at every step against the reference GPT's.
The kernels' CPU stand-ins (tests/cpu_kernels.py) compute each op's function, so what is tested is everything
around the kernels as the model runs it; the kernels themselves are checked on a GPU (tests/test_decode_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from cpu_kernels import allow_cpu, register
from helpers import rel_err, tiny_gpt

from gptcore.kernels import decode_attention as DA
from gptcore.kernels import decode_linear as DL
from gptcore.sampling import Decoder
from gptcore.verify.common import decode_attention_reference

SIZES = dict(block_size=24, vocab_size=45, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    register()


@pytest.fixture(autouse=True)
def cpu_allowed(monkeypatch):
    allow_cpu(monkeypatch)


def test_decode_ops_pass_opcheck():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w, b = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96)
    ln_w, ln_b = torch.randn(64), torch.randn(64)
    torch.library.opcheck(DL.decode_linear_op, (x, w, b, ln_w, ln_b, None, 1e-5, True))
    torch.library.opcheck(DL.decode_linear_op, (x, w, b, None, None, torch.randn(3, 96), 1e-5, False))
    qkv = torch.randn(3, 3 * 64, dtype=torch.bfloat16)
    k_cache, v_cache = torch.randn(3, 2, 10, 32, dtype=torch.bfloat16), torch.randn(3, 2, 10, 32, dtype=torch.bfloat16)
    torch.library.opcheck(DA.decode_attention_op, (qkv, k_cache, v_cache, 4, 2))


def test_decode_attention_reference_attends_over_the_cache_and_appends():
    torch.manual_seed(0)
    b, h, hd, pos = 2, 3, 16, 5
    qkv = torch.randn(b, 3 * h * hd, dtype=torch.float64)
    k_cache, v_cache = torch.randn(b, h, 8, hd, dtype=torch.float64), torch.randn(b, h, 8, hd, dtype=torch.float64)
    out = decode_attention_reference(qkv, k_cache, v_cache, pos, h)
    q, k, v = qkv.view(b, 3, h, hd).unbind(1)
    assert torch.equal(k_cache[:, :, pos], k) and torch.equal(v_cache[:, :, pos], v)
    keys, values = k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1]
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values)[:, :, 0]
    assert rel_err(out, expected.reshape(b, h * hd)) < 1e-12


@pytest.mark.parametrize("pos", [0, 1, 63, 64, 255, 700, 1023])
@pytest.mark.parametrize("pairs", [1, 6, 12, 64 * 12])
def test_split_plan_covers_the_keys_and_every_split_starts_at_or_before_pos(pos, pairs):
    tiles = DA.tiles_for("sm_90")
    splits, per_split = DA.split_plan(pos, pairs, tiles, 132)
    n_tiles = -(-(pos + 1) // tiles.tile_n)
    assert splits >= 1 and splits * per_split >= n_tiles
    assert (splits - 1) * per_split * tiles.tile_n <= pos  # the last split's first key is a real one
    assert splits == 1 or per_split >= tiles.min_tiles_per_split


def test_decode_linear_names_the_bad_argument():
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual must be \\(2, 96\\)"):
        DL.decode_linear(x, w, residual=torch.randn(2, 64))
    with pytest.raises(ValueError, match="x must be \\(M, K\\)"):
        DL.decode_linear(x, torch.randn(96, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        DL.decode_linear(x, w.float())
    with pytest.raises(ValueError, match="pos 10 is outside"):
        DA.decode_attention(torch.randn(1, 192, dtype=torch.bfloat16), *torch.zeros(2, 1, 2, 10, 32), 10, 2)


def _step_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list]:
    """The logits after the prompt (prefill into an empty cache) and after each of `tokens` fed one at a time."""
    cache = model.new_kv_cache(prompt.size(0))
    with torch.no_grad():
        out = [model(prompt, kv_cache=cache)[0]]
        for i in range(tokens.size(1)):
            out.append(model(tokens[:, i : i + 1], kv_cache=cache)[0])
    return out, cache


@pytest.mark.parametrize("batch", [1, 3])
def test_cutile_decode_steps_match_the_reference_model_and_fill_the_same_cache(batch):
    ref = tiny_gpt("torch", **SIZES).to(torch.bfloat16).eval()
    cand = tiny_gpt("cutile", **SIZES).to(torch.bfloat16).eval()
    cand.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(SIZES["vocab_size"], (batch, 5), generator=g)
    tokens = torch.randint(SIZES["vocab_size"], (batch, SIZES["block_size"] - 5), generator=g)
    ref_logits, ref_cache = _step_logits(ref, prompt, tokens)
    cand_logits, cand_cache = _step_logits(cand, prompt, tokens)
    for step, (a, b) in enumerate(zip(cand_logits, ref_logits)):
        assert a.shape == b.shape == (batch, 1, SIZES["vocab_size"]) and a.dtype == torch.bfloat16
        assert rel_err(a, b) < 2e-2, f"step {step}"
    for a, b in zip(cand_cache, ref_cache):
        assert a.length == b.length == SIZES["block_size"]
        assert rel_err(a.k, b.k) < 2e-2 and rel_err(a.v, b.v) < 2e-2
    with pytest.raises(ValueError, match="longer than block_size"):
        cand(tokens[:, :1], kv_cache=cand_cache)


def test_cutile_decode_under_autocast_reads_the_half_copies_and_matches_the_reference():
    ref = tiny_gpt("torch", **SIZES).eval()
    cand = tiny_gpt("cutile", **SIZES).eval()
    cand.load_state_dict(ref.state_dict())
    prompt = torch.randint(SIZES["vocab_size"], (2, 3), generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(SIZES["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, _ = _step_logits(ref, prompt, tokens)
        cand_logits, cache = _step_logits(cand, prompt, tokens)
    assert cand.lm_head.weight_half.dtype == torch.bfloat16  # the decode step's weights: the half copies
    assert cache[0].k.dtype == torch.float32  # the reference's cache (the weights' dtype), written by the kernel
    for a, b in zip(cand_logits, ref_logits):
        assert rel_err(a, b) < 2e-2


def test_greedy_decoder_on_the_cutile_model_gives_the_reference_tokens():
    """The sampling loop as the bot and the sample stage run it: prefill, decode steps, and past block_size the
    window's rebuild, on both models: the same greedy tokens (a trained-like model: sharper logits)."""
    ref = tiny_gpt("torch", **SIZES).to(torch.bfloat16).eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(8)  # confident picks, so bf16 rounding cannot flip a near-tie
    cand = tiny_gpt("cutile", **SIZES).to(torch.bfloat16).eval()
    cand.load_state_dict(ref.state_dict())
    prompt = torch.randint(SIZES["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(4))
    n = SIZES["block_size"] + 6
    expected = Decoder(ref, 2, temperature=0).generate(prompt, n)
    assert torch.equal(Decoder(cand, 2, temperature=0).generate(prompt, n), expected)


def test_the_decode_step_compiles_with_no_graph_break_and_the_eager_logits():
    """torch.compile(fullgraph=True) of a decode step: one graph of the decode ops (the cache's k and v written by
    the attention op, a mutation the graph records), and the eager step's logits and cache."""
    model = tiny_gpt("cutile", **SIZES).to(torch.bfloat16).eval()
    prompt = torch.randint(SIZES["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(5))
    token = torch.randint(SIZES["vocab_size"], (2, 1), generator=torch.Generator().manual_seed(6))
    caches = []
    for _ in range(3):
        cache = model.new_kv_cache(2)
        with torch.no_grad():
            model(prompt, kv_cache=cache)
        caches.append(cache)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(token, kv_cache=caches[2])
    assert explained.graph_break_count == 0, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    for op in ("decode_linear", "decode_attention"):
        assert [t for t in targets if f"gptcore.{op}" in t], (op, targets)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(token, kv_cache=caches[0])[0]
        graphed = compiled(token, kv_cache=caches[1])[0]
    torch.testing.assert_close(graphed, eager)
    for a, b in zip(caches[1], caches[0]):
        assert a.length == b.length == 6 and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.parametrize("prompt_len", [1, 6, 20])
def test_decoding_in_chunks_of_steps_gives_the_tokens_of_single_steps(prompt_len):
    """tokens_per_graph > 1 runs the steps in chunks that end on its multiples (eagerly here; one graph each on a
    GPU): the same sampled tokens as one step at a time, through the block's end and the window's slides."""
    model = tiny_gpt("torch", **SIZES).eval()
    prompt = torch.randint(SIZES["vocab_size"], (2, prompt_len), generator=torch.Generator().manual_seed(8))
    single = Decoder(model, 2, 0.8, 10, generator=torch.Generator().manual_seed(9)).generate(prompt, 40)
    chunked = Decoder(model, 2, 0.8, 10, generator=torch.Generator().manual_seed(9), tokens_per_graph=8)
    runs = []
    real_run = chunked._run
    chunked._run = lambda start, n, steps: (runs.append((n, steps)), real_run(start, n, steps))
    assert torch.equal(chunked.generate(prompt, 40), single)
    multi = [(n, steps) for n, steps in runs if steps > 1]
    assert multi and all((n + steps) % 8 == 0 or n + steps == SIZES["block_size"] for n, steps in multi)
    with pytest.raises(ValueError, match="tokens_per_graph must be a positive integer"):
        Decoder(model, 1, tokens_per_graph=0)


def test_auto_backend_is_the_faster_decode_measured(monkeypatch):
    import gptcore.sampling as S

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert S.resolve_backend("auto", cpu, torch.float32, cuda_graph=False) == "torch"  # cuTile cannot run here
    assert S.resolve_backend("cutile", cpu, torch.bfloat16, cuda_graph=True) == "cutile"  # named: as named
    monkeypatch.setattr(S, "cutile_unavailable", lambda device: None)  # as on a GPU with cuTile
    assert S.resolve_backend("auto", cuda, torch.bfloat16, cuda_graph=False) == "cutile"
    assert S.resolve_backend("auto", cuda, torch.bfloat16, cuda_graph=True) == "torch"
    assert S.resolve_backend("auto", cuda, torch.float32, cuda_graph=False) == "torch"  # fp32: no cuTile attention
