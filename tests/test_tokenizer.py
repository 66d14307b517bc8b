"""Tokenizers: byte-level BPE trained by the prepare stage (deterministic, exact round trips), a tokenizer.json
the user brings (uint32 token files beyond 65536 ids), and the tokenizer travelling inside the checkpoint, so
sampling needs no data folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import SPEECHES, env_for, run, tiny_params_dict, write_corpus

from gptcore import data
from gptcore import tokenizer as tok
from gptcore.errors import DataError
from gptcore.params import ParamsError, parse_params


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def test_bpe_prepare_round_trips_and_is_deterministic(tmp_path, corpus):
    text = corpus.read_text()
    stats = data.prepare("corpus.txt", tmp_path / "a", 0.1, root=tmp_path, tokenizer="bpe", vocab_size=300)
    bpe = tok.load(tmp_path / "a")
    assert bpe.kind == "bpe" and 256 < bpe.tokens <= 300 and bpe.vocab_size == 320  # padded to a multiple of 64
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert (meta["kind"], meta["vocab_size"], meta["dtype"]) == ("bpe", 320, "uint16")
    train, val = data.load_split(tmp_path / "a", "train"), data.load_split(tmp_path / "a", "val")
    n_train = int(len(text) * 0.9)
    assert bpe.decode(train) == text[:n_train] and bpe.decode(val) == text[n_train:]  # exact, byte-level
    assert len(train) < 0.8 * n_train and stats["train_tokens"] == len(train)  # merges: fewer tokens than chars
    assert int(train.max()) < bpe.tokens
    data.prepare("corpus.txt", tmp_path / "b", 0.1, root=tmp_path, tokenizer="bpe", vocab_size=300)
    for name in ("tokenizer.json", "train.bin", "val.bin"):  # the same corpus, the same tokenizer and tokens
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bpe_encodes_any_text_and_the_json_travels():
    bpe = tok.BPETokenizer.train(SPEECHES * 5, 290)
    for text in ("héllo wörld — 1 € \t end\n", "MENENIUS:\nSpeak, speak.", ""):
        assert bpe.decode(bpe.encode(text)) == text
    again = tok.from_json(bpe.to_json())
    assert again.encode(SPEECHES) == bpe.encode(SPEECHES) and again.vocab_size == bpe.vocab_size
    with pytest.raises(DataError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(DataError, match="not a gptcore tokenizer"):
        tok.from_json('{"kind": "wordpiece"}')


def test_a_users_tokenizer_json_with_more_than_65536_ids_writes_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    user = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    user.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    user.save(str(tmp_path / "words.json"))
    (tmp_path / "text.txt").write_text(" ".join(words[-50:] * 20))
    stats = data.prepare("text.txt", tmp_path / "out", 0.2, root=tmp_path, tokenizer="words.json")
    assert stats["vocab_size"] == 70_016  # 70000 rounded up to a multiple of 64
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["dtype"] == "uint32"
    train = data.load_split(tmp_path / "out", "train")
    assert train.dtype == np.uint32 and int(train.max()) == 69_999


def test_tokenizer_params_are_checked(tmp_path):
    raw = tiny_params_dict()
    raw["data"]["vocab_size"] = 100
    with pytest.raises(ParamsError, match=r"data\.vocab_size: Input should be greater than or equal to 257"):
        parse_params(raw)
    with pytest.raises(DataError, match=r"data\.tokenizer: 'nope\.json' is neither char, bpe nor a tokenizer\.json"):
        data.prepare(str(write_corpus(tmp_path / "c.txt")), tmp_path / "out", tokenizer="nope.json", root=tmp_path)


@pytest.mark.slow
def test_a_bpe_checkpoint_carries_its_tokenizer(tmp_path):
    """prepare (bpe) and train in one folder; sample from the checkpoint in another, with no data folder."""
    write_corpus(tmp_path / "corpus.txt")
    raw = tiny_params_dict(data={"tokenizer": "bpe", "vocab_size": 300}, train={"max_iters": 10})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**env_for(tmp_path), "GPTCORE_MLFLOW": "off"}
    for name in ("prepare", "train"):
        run([sys.executable, "-m", "gptcore", name], tmp_path, env=env)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == 320 and tok.from_json(ckpt["tokenizer"]).kind == "bpe"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text(yaml.safe_dump(raw))
    for name in ("ckpt.pt", "ckpt.json"):
        (elsewhere / name).write_bytes((tmp_path / "out" / name).read_bytes())
    run(
        [
            sys.executable,
            "-m",
            "gptcore",
            "sample",
            "--checkpoint",
            "ckpt.pt",
            "--prompt",
            "MENENIUS:",
            "--num-samples",
            "1",
            "--max-new-tokens",
            "20",
        ],
        elsewhere,
        env=env,
    )
    text = (elsewhere / "samples" / "samples.txt").read_text()
    assert text.startswith("==> sample 1 of 1 <==\nMENENIUS:") and not (elsewhere / "data").exists()
