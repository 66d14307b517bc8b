"""The reference GPT: tying, init, causality, attention paths, nanoGPT compatibility, KV cache."""

import math

import pytest
import torch
from helpers import tiny_gpt

from gptcore.checkpoint import clean_state_dict, gpt_from_checkpoint
from gptcore.model import GPT, GPTConfig, causal_attention_reference

SIZES = dict(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)


def tiny(**kw) -> GPT:
    return tiny_gpt(**{**SIZES, **kw}).eval()


def test_weight_tying_is_one_tensor():
    m = tiny()
    assert m.transformer.wte.weight is m.lm_head.weight
    assert m.transformer.wte.weight.data_ptr() == m.lm_head.weight.data_ptr()
    # one tensor: an update through one name shows through the other, and parameters() counts it once
    with torch.no_grad():
        m.lm_head.weight[0, 0] = 123.0
    assert m.transformer.wte.weight[0, 0].item() == 123.0
    names = [n for n, _ in m.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    m = GPT(cfg)
    sd = dict(m.named_parameters())
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"):
        assert sd[name].std().item() == pytest.approx(expected, rel=0.05), name
    for name, p in sd.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
            assert torch.all(p == 1), name


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    m = tiny()
    idx = torch.randint(0, 50, (2, 20))
    logits, _ = m(idx, targets=idx)
    idx2 = idx.clone()
    idx2[:, 12] = (idx2[:, 12] + 1) % 50
    logits2, _ = m(idx2, targets=idx2)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_hand_written_attention_matches_sdpa_and_stays_finite_in_fp16():
    m = tiny()
    idx = torch.randint(0, 50, (2, 17))
    a, _ = m(idx, targets=idx)  # SDPA: every query against its own keys
    cache = m.new_kv_cache(2)
    m(idx[:, :12], kv_cache=cache)
    # five queries continuing the cached prefix: the hand-written, bottom-right aligned attention
    rest = idx[:, 12:].contiguous()
    b, _ = m(rest, targets=rest, kv_cache=cache)
    torch.testing.assert_close(a[:, 12:], b, rtol=1e-4, atol=1e-5)
    # huge scores in fp16: the -1e20 floor is applied in fp32, no row becomes NaN
    q = torch.randn(1, 2, 9, 16).half() * 300
    out = causal_attention_reference(q, q, torch.randn(1, 2, 9, 16).half())
    assert torch.isfinite(out).all()


def test_loss_is_cross_entropy_of_the_logits():
    m = tiny()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = m(idx, targets=idx)
    assert logits.shape == (3, 10, 50)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    last, none = m(idx)
    assert none is None and last.shape == (3, 1, 50)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_nanogpt_format_checkpoint_loads():
    m = tiny(bias=False)
    # nanoGPT's train.py saves the compiled model's state dict (prefix `_orig_mod.`) with both tied
    # names present, and its slow attention path registers a causal-mask buffer `attn.bias`.
    sd = {f"_orig_mod.{k}": v.clone() for k, v in m.state_dict().items()}
    sd["_orig_mod.lm_head.weight"] = sd["_orig_mod.transformer.wte.weight"]
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    ckpt = {
        "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=False, vocab_size=50, dropout=0.0),
        "model": sd,
    }
    m2 = gpt_from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(m(idx)[0], m2(idx)[0])
    assert m2.transformer.wte.weight is m2.lm_head.weight
    assert "module.x" not in clean_state_dict({"module.x": torch.zeros(1)})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPTConfig(n_embd=65, n_head=4)
    with pytest.raises(ValueError, match="missing block_size"):
        GPTConfig.from_dict({"vocab_size": 5, "n_layer": 1, "n_head": 1, "n_embd": 4})


def test_crop_block_size_and_too_long_input():
    m = tiny()
    m.crop_block_size(16)
    assert m.transformer.wpe.weight.shape[0] == 16
    with pytest.raises(ValueError, match="longer than block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cache_decoding_matches_full_forward():
    m = tiny()
    idx = torch.randint(0, 50, (2, 20))
    cache = m.new_kv_cache(2)
    logits, _ = m(idx[:, :12], kv_cache=cache)  # prefill
    torch.testing.assert_close(logits[:, -1], m(idx[:, :12])[0][:, -1], rtol=1e-5, atol=1e-5)
    for t in range(12, 20):  # one token at a time against the cache
        step, _ = m(idx[:, t : t + 1], kv_cache=cache)
        full, _ = m(idx[:, : t + 1])
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
