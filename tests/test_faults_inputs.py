"""Bad inputs a user can give, each run as the user would on a project after the quickstart (prepared, trained,
transplanted): a params.yaml that is not UTF-8 or repeats a key, bytes that are not UTF-8 on a command line or
typed to the bot, NaN weights, a model too large for memory, a BPE vocabulary the corpus cannot yield. Each is
refused in one line that names the problem, a stage exits 2, and every good artifact stays byte for byte."""

from __future__ import annotations

import importlib
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import digests, env_for, tiny_params_dict, write_corpus

from gptcore import chat, memory, stage
from gptcore.errors import ParamsError
from gptcore.model import GPTConfig

ARTIFACTS = ("data", "out", "cutile", "metrics", "plots", "samples")  # what the stages write


def run_stage(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """A stage as `python -m gptcore NAME` runs it (its error policy included): (exit status, stderr)."""
    module = importlib.import_module(f"gptcore.stages.{name}")
    capsys.readouterr()
    code = stage.main(lambda: module.main(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A project after prepare, train and transplant (tiny params, MLflow off), made once for the module."""
    root = tmp_path_factory.mktemp("quickstart")
    write_corpus(root / "corpus.txt")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("GPTCORE_MLFLOW", "off")
        for name in ("prepare", "train", "transplant"):
            module = importlib.import_module(f"gptcore.stages.{name}")
            assert stage.main(lambda m=module: m.main([])) == 0, name
    return root


@pytest.fixture
def project(quickstart, tmp_path, monkeypatch):
    """A fresh copy of the quickstart project, the working directory of the test."""
    root = tmp_path / "project"
    shutil.copytree(quickstart, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("GPTCORE_MLFLOW", "off")
    return root


def utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def one_line(err: str) -> str:
    """The message of a refusal: one line starting `error: `, no traceback."""
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def python_m(args: list, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`python -m ...` in `cwd` as a user types it; args may be bytes (what a shell passes on)."""
    env = {**env_for(cwd), "GPTCORE_MLFLOW": "off"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, input=stdin, capture_output=True, env=env)


# ---- params.yaml --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prepare", "train", "transplant", "verify", "bench", "sample"])
def test_a_params_file_that_is_not_utf8_is_refused_naming_the_byte(project, capsys, name):
    before = digests(project, ARTIFACTS)
    good = (project / "params.yaml").read_bytes()
    with open(project / "params.yaml", "ab") as f:
        f.write(b"# caf\xe9\n")  # printf '# caf\xe9\n' >> params.yaml
    code, err = run_stage(name, [], capsys)
    line = good.count(b"\n") + 1
    assert code == 2
    assert one_line(err) == (
        f"error: params.yaml: not UTF-8 text: byte 0xe9 at line {line}, column 6 (byte offset {len(good) + 5}, "
        "invalid continuation byte); save it as UTF-8\n"
    )
    assert digests(project, ARTIFACTS) == before


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "params.yaml: not UTF-8 text: byte 0x89 at line 1, column 1 (byte offset 0"),
        (b"data:\n\0\0\0\0", "params.yaml: not a text file: character 0x0000 at line 2 (special characters"),
    ],
    ids=["png", "nul-bytes"],
)
def test_a_binary_params_file_is_refused(project, capsys, content, message):
    before = digests(project, ARTIFACTS)
    (project / "params.yaml").write_bytes(content)
    code, err = run_stage("train", [], capsys)
    assert code == 2 and message in one_line(err)
    assert digests(project, ARTIFACTS) == before


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda text: text + "model:\n  n_layer: 3\n", "model"),
        (lambda text: text.replace("  n_layer: 1\n", "  n_layer: 1\n  n_layer: 3\n", 1), "model.n_layer"),
    ],
    ids=["a-section-twice", "a-key-twice"],
)
def test_a_duplicate_key_is_refused_naming_it_and_both_lines(project, capsys, edit, key):
    before = digests(project, ARTIFACTS)
    text = edit((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(text)
    rows = text.splitlines()
    leaf = key.split(".")[-1]
    first, again = [i + 1 for i, row in enumerate(rows) if row.strip().startswith(f"{leaf}:")][:2]
    code, err = run_stage("train", [], capsys)
    assert code == 2
    assert one_line(err) == (
        f"error: params.yaml: duplicate key {key} at lines {first} and {again}: YAML would keep only the last "
        "value (DVC refuses the file); keep one\n"
    )
    assert digests(project, ARTIFACTS) == before


# ---- bytes that are not UTF-8: the command line and the bot ------------------------------------------------


@pytest.mark.slow
def test_a_prompt_of_bytes_that_are_not_utf8_is_refused(project):
    before = digests(project, ARTIFACTS)
    out = python_m(["gptcore", "sample", "--prompt", b"caf\xe9"], project)  # --prompt $'caf\xe9'
    assert out.returncode == 2, out.stderr
    err = one_line(out.stderr.decode())
    assert err == "error: sample.prompt 'caf\\udce9': not UTF-8 text: byte 0xe9 at character 3\n"
    assert digests(project, ARTIFACTS) == before


@pytest.mark.slow
def test_the_bot_refuses_a_line_that_is_not_utf8_and_answers_the_next(project):
    before = digests(project, ARTIFACTS)
    bot = ["gptcore.chat", "--checkpoint", "out/ckpt.pt", "--max-new-tokens", "20"]
    out = python_m(bot, project, stdin=b"ROMEO: caf\xe9\nAll: Speak, speak.\n")  # printf '...' | python -m gptcore.chat
    assert out.returncode == 0 and not out.stderr, out.stderr
    _, refusal, *answer = out.stdout.decode().splitlines(keepends=True)
    assert refusal == (
        "error: line 1 is not UTF-8 text: byte 0xe9 at byte offset 10 (invalid continuation byte); it was not sent\n"
    )
    alone = python_m(bot, project, stdin=b"All: Speak, speak.\n").stdout.decode().splitlines(keepends=True)
    assert answer == alone[1:] and "".join(answer).strip()  # the answer the good line gets on its own
    assert digests(project, ARTIFACTS) == before


def test_the_bot_takes_binary_input_line_by_line(project, monkeypatch, capsys):
    before = digests(project, ARTIFACTS)
    typed = random.Random(0).randbytes(4000) + b"\nAll: Speak.\n"
    stdin = io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8")  # as a real stdin: bytes beneath the text
    monkeypatch.setattr(sys, "stdin", stdin)
    assert chat.main(["--checkpoint", "out/ckpt.pt", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    refused = [line for line in lines if line.startswith("error: line ") and "is not UTF-8 text: byte 0x" in line]
    assert len(refused) == sum(1 for line in typed.split(b"\n") if not utf8(line)) > 5
    assert not lines[-1].startswith("error")  # the last line, a speech, was answered
    assert digests(project, ARTIFACTS) == before


# ---- NaN weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage_name,argv",
    [
        ("transplant", ["--set", "transplant.source=nan/ckpt.pt"]),
        ("verify", ["--checkpoint", "nan/ckpt.pt"]),
        ("sample", ["--checkpoint", "nan/ckpt.pt"]),
    ],
)
def test_nan_weights_are_named_as_such_not_as_a_broken_tie(project, capsys, stage_name, argv):
    before = digests(project, ARTIFACTS)
    ck = torch.load(project / "out" / "ckpt.pt", weights_only=True)
    ck["model"]["transformer.wte.weight"][3, :5] = float("nan")  # the tied embedding: lm_head.weight too
    (project / "nan").mkdir()
    torch.save(ck, project / "nan" / "ckpt.pt")
    code, err = run_stage(stage_name, argv, capsys)
    assert code == 2
    where, _, message = one_line(err).removeprefix("error: ").partition(": ")
    assert Path(where).resolve() == project / "nan" / "ckpt.pt"  # as given, or absolute: the file
    assert message == "non-finite values in 1 tensors: transformer.wte.weight (5 NaN, 0 inf)\n"
    assert digests(project, ARTIFACTS) == before


# ---- a model too large for memory -----------------------------------------------------------------------------


def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(project, capsys):
    before = digests(project, ARTIFACTS)
    code, err = run_stage("train", ["--set", "model.n_embd=65536", "--set", "model.n_head=1"], capsys)
    assert code == 2
    params = memory.n_params(GPTConfig(block_size=16, vocab_size=44, n_layer=1, n_head=1, n_embd=65536))
    assert params > 50e9
    assert one_line(err).startswith(
        f"error: model too large for cpu memory: model.n_layer=1, model.n_embd=65536 and vocab 44 give {params:,} "
        f"parameters: {params * 16 / 2**30:,.1f} GiB for weights, gradients and AdamW state (16 bytes each) plus "
        "at least "
    )
    assert "GiB of activations at train.batch_size=8 x model.block_size=16" in err and "GiB available RAM" in err
    assert digests(project, ARTIFACTS) == before


def test_the_estimate_refuses_only_what_cannot_fit(monkeypatch):
    config = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=128)
    params, state, activations = memory.training_bytes(config, 16, torch.float32)
    assert params == 12 * 2 * 128**2 + 13 * 2 * 128 + 128 * (100 + 64) + 2 * 128 and state == 16 * params
    assert activations == 16 * 64 * 4 * (2 * 8 * 128 + 100)
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: (state + activations, "available RAM"))
    memory.check_fits(config, 16, cpu, torch.float32)  # just fits
    with pytest.raises(ParamsError, match=r"model too large for cpu memory: model.n_layer=2, model.n_embd=128"):
        memory.check_fits(config, 17, cpu, torch.float32)
    monkeypatch.undo()
    free, source = memory.available_bytes(cpu)  # this machine's own figure
    assert source == "available RAM" and free > 0


# ---- a BPE vocabulary the corpus cannot yield -------------------------------------------------------------


def test_a_bpe_vocab_beyond_what_the_corpus_can_yield_is_refused_before_training(project, capsys):
    before = digests(project, ARTIFACTS)
    argv = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=10000000"]
    code, err = run_stage("prepare", argv, capsys)
    n_bytes = int(len((project / "corpus.txt").read_bytes()) * (1 - 0.1))  # the training split, ASCII
    assert code == 2
    assert one_line(err) == (
        f"error: data.vocab_size: 10,000,000 is more than byte-level BPE can learn from the training split "
        f"({n_bytes:,} bytes: 256 byte tokens and at most one merge per further byte, {255 + n_bytes:,} in all); "
        "lower data.vocab_size\n"
    )
    assert digests(project, ARTIFACTS) == before


def test_prepare_records_the_vocabulary_bpe_learned_and_says_it_is_smaller(project, capsys):
    code, err = run_stage("prepare", ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=5000"], capsys)
    assert code == 0
    meta = json.loads((project / "data" / "meta.json").read_text())
    learned = meta["tokens"]
    assert 256 < learned < 5000 and meta["vocab_size"] == 5000  # the rows asked for, as GPT-2 small's 50304
    assert err == (
        f"warning: data.vocab_size: 5,000 asked, but BPE learned {learned:,} tokens from the training split (no "
        f"pair left to merge); the model keeps 5,000 rows, {5000 - learned:,} of them never used (a smaller "
        "data.vocab_size drops them)\n"
    )
    argv = ["--set", "data.tokenizer=bpe", "--set", "train.max_iters=2", "--set", "train.eval_interval=2"]
    assert run_stage("train", argv, capsys)[0] == 0  # the model takes the rows the data has
    ck = torch.load(project / "out" / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["vocab_size"] == meta["vocab_size"]
