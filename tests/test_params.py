"""params.yaml validation: every problem stops the stage with a message naming the key."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from gptcore.model import GPT, GPTConfig
from gptcore.params import PRESETS_DIR, ParamsError, load_params, parse_params
from gptcore.presets import apply_preset, available

ROOT = Path(__file__).resolve().parents[1]


def defaults() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_the_cpu_preset():
    """params.yaml loads and holds the tiny CPU-sized model the quickstart promises (the tiny_cpu preset)."""
    p = load_params(ROOT / "params.yaml")
    preset = yaml.safe_load((PRESETS_DIR / "tiny_cpu.yaml").read_text())
    for section, values in preset.items():
        for key, value in values.items():
            assert getattr(getattr(p, section), key) == value, f"{section}.{key}"
    assert (p.model.n_layer, p.model.n_embd, p.train.device, p.train.backend) == (2, 128, "auto", "torch")


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("train", "learning_rate", -1e-3, r"train\.learning_rate: Input should be greater than 0"),
        ("train", "batch_size", "big", r"train\.batch_size: Input should be a valid integer"),
        ("train", "backend", "jax", r"train\.backend: Input should be 'torch' or 'cutile'"),
        ("train", "lerning_rate", 1e-3, r"train\.lerning_rate: unknown key"),
        ("model", "n_embd", 130, r"model: .*n_embd \(130\) must be divisible by n_head \(4\)"),
        ("data", "val_fraction", 1.5, r"data\.val_fraction: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    raw = defaults()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_unknown_section_and_min_lr_above_lr():
    raw = defaults()
    raw["trian"] = {}
    with pytest.raises(ParamsError, match=r"trian: unknown key"):
        parse_params(raw)
    raw = defaults()
    raw["train"]["min_lr"] = 1.0
    with pytest.raises(ParamsError, match=r"min_lr \(1.0\) must not exceed learning_rate"):
        parse_params(raw)


@pytest.mark.parametrize(
    "other,message",
    [
        ({"compile": True}, r"train\.cuda_graph: .*cannot be combined with train\.compile: true"),
        ({"compile": "reduce-overhead"}, r"cannot be combined with train\.compile: reduce-overhead"),
        ({"dtype": "float16"}, r"train\.cuda_graph: .*cannot be combined with train\.dtype: float16"),
    ],
)
def test_cuda_graph_conflicts_are_refused_when_params_load(other, message):
    raw = defaults()
    assert raw["train"]["cuda_graph"] is False  # off by default, listed in params.yaml
    raw["train"].update(cuda_graph=True, **other)
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)
    raw["train"]["cuda_graph"] = False
    parse_params(raw)  # the other setting alone is fine
    raw["train"].update(cuda_graph=True, compile=False, dtype="bfloat16")
    assert parse_params(raw).train.cuda_graph is True


@pytest.mark.parametrize("setting", [False, True, "reduce-overhead"])
def test_train_compile_is_off_on_or_reduce_overhead(setting):
    raw = defaults()
    raw["train"]["compile"] = setting
    assert parse_params(raw).train.compile == setting
    raw["train"]["compile"] = "max-speed"
    with pytest.raises(ParamsError, match=r"train\.compile: .*reduce-overhead"):
        parse_params(raw)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["shakespeare_char", "gpt2_small", "tiny_cpu"])
def test_presets_apply_and_keep_comments(tmp_path, name):
    assert name in available()
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    apply_preset(name, target)
    p = load_params(target)
    text = target.read_text()
    assert "# GPU presets" in text  # comments survive
    if name == "shakespeare_char":
        assert (p.model.n_layer, p.model.n_head, p.model.n_embd, p.model.block_size) == (6, 6, 384, 256)
        assert (p.train.batch_size, p.train.max_iters, p.train.warmup_iters) == (64, 5000, 100)
        assert (p.model.dropout, p.train.learning_rate, p.train.min_lr, p.train.beta2) == (0.2, 1e-3, 1e-4, 0.99)
        assert (p.train.eval_interval, p.train.eval_iters) == (250, 200)
    if name == "gpt2_small":
        assert (p.model.n_layer, p.model.n_head, p.model.n_embd, p.model.block_size) == (12, 12, 768, 1024)
        assert (p.data.tokenizer, p.data.vocab_size, p.train.beta2, p.train.learning_rate) == ("bpe", 50304, 0.95, 6e-4)
        with torch.device("meta"):  # GPT-2 small: 124M parameters at its vocabulary
            gpt2 = GPT(GPTConfig(block_size=1024, vocab_size=p.data.vocab_size, n_layer=12, n_head=12, n_embd=768))
        assert round(gpt2.num_params(non_embedding=False) / 1e6) == 124
    if name == "tiny_cpu":
        assert p.model == load_params(ROOT / "params.yaml").model


def test_unknown_preset(tmp_path):
    with pytest.raises(ParamsError, match="unknown preset 'huge'"):
        apply_preset("huge", ROOT / "params.yaml")
