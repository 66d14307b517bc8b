"""The interactive bot on a CPU (torch backend), driven by a scripted stdin: speeches in the corpus's shape,
/commands, characters the corpus never had reported rather than crashed on, the conversation kept as
context, and the same transcript from the same seed."""

from __future__ import annotations

import io
import sys

import torch
from pipeline_helpers import ROOT, SPEECHES, env_for, run

from gptcore import chat
from gptcore.model import GPT, GPTConfig
from gptcore.params import SampleParams
from gptcore.sampling import Decoder, stream_text
from gptcore.tokenizer import BPETokenizer, CharTokenizer


def checkpoint(path):
    torch.manual_seed(0)
    vocab = CharTokenizer.from_text(SPEECHES)
    config = GPTConfig(block_size=32, vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=32)
    torch.save({"model_args": config.to_dict(), "model": GPT(config).state_dict(), "tokenizer": vocab.to_json()}, path)
    return vocab


def talk(monkeypatch, capsys, ckpt, script: str, *args) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert chat.main(["--params", str(ROOT / "params.yaml"), "--checkpoint", str(ckpt), *args]) == 0
    return capsys.readouterr().out


def test_a_scripted_conversation(tmp_path, monkeypatch, capsys):
    checkpoint(tmp_path / "ckpt.pt")
    script = "\n".join(
        ["All: Speak, speak.", "/temperature 0", "/max-new-tokens 12", "MENENIUS: ¿Qué?", "/top-k off"]
        + ["First Citizen: Resolved."]
        + ["/bogus", "/quit", "All: unread", ""]
    )
    out = talk(monkeypatch, capsys, tmp_path / "ckpt.pt", script, "--max-new-tokens", "20")
    lines = out.splitlines()
    assert lines[0].startswith("gptcore chat: ") and "/help" in lines[0]
    assert "(torch on cpu, float32, eager)" in lines[0]  # the decode path: backend auto on a CPU, no graphs
    assert "ok: temperature 0.0, top-k 200, top-p off, max-new-tokens 20" in out
    assert "ok: temperature 0.0, top-k 200, top-p off, max-new-tokens 12" in out
    assert "error: characters not in the vocabulary: 'Q', '¿', 'é'" in out  # reported; the bot goes on
    assert "ok: temperature 0.0, top-k off, top-p off, max-new-tokens 12" in out and "unknown command /bogus" in out
    assert "unread" not in out  # /quit ends it
    assert chat.PROMPT not in out  # piped: no prompts in the transcript
    again = talk(monkeypatch, capsys, tmp_path / "ckpt.pt", script, "--max-new-tokens", "20")
    assert again == out  # the same seed and script, the same transcript


def test_turns_take_the_corpus_shape_and_commands_check_their_values():
    assert chat.as_speech("MENENIUS: What work's, my countrymen?") == "MENENIUS:\nWhat work's, my countrymen?\n\n"
    assert chat.as_speech("no speaker here") == "no speaker here\n\n"
    settings = SampleParams(temperature=0.8, top_k=200, top_p=None, max_new_tokens=300)
    for command, message in [
        ("/temperature -1", "sample.temperature: Input should be greater than or equal to 0, got -1.0"),
        ("/top-k 0", "sample.top_k: must be at least 1 (off or null: no top-k cut), got 0"),
        ("/top-p lots", "could not convert string to float: 'lots'"),
        ("/max-new-tokens 0", "sample.max_new_tokens: Input should be greater than or equal to 1, got 0"),
    ]:
        unchanged, said = chat.apply_command(command, settings)
        assert unchanged is settings and said == f"{command}: {message}"
    settings, said = chat.apply_command("/top-p 0.9", settings)
    assert said.startswith("ok:") and settings.top_p == 0.9
    settings, said = chat.apply_command("/top-k off", settings)
    assert settings == SampleParams(temperature=0.8, top_k=None, top_p=0.9, max_new_tokens=300)


def test_a_reply_ends_with_its_speech_and_sees_the_whole_conversation():
    vocab = CharTokenizer.from_text(SPEECHES)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    seen = []
    original = model.forward

    def spy(idx, targets=None, kv_cache=None):
        seen.append(idx.size(1) + (kv_cache[0].length if kv_cache else 0))
        return original(idx, targets, kv_cache)

    model.forward = spy
    decoder = Decoder(model, 1, 0.0)
    conversation = "All:\nSpeak, speak.\n\nFirst Citizen:\nResolved.\n\n"
    text = "".join(chat.Reply(decoder, vocab, conversation, 100))
    assert "\n\n" not in text.lstrip("\n")  # cut at the end of the speech
    assert seen[0] == 32  # the prefill saw a full window of the conversation (the last block_size tokens)
    whole = "".join(stream_text(Decoder(model, 1, 0.0), vocab, vocab.encode(conversation)[-32:], 100))
    assert whole.startswith(text)  # the same greedy tokens, not cut


def test_the_bot_as_a_command(tmp_path):
    checkpoint(tmp_path / "ckpt.pt")
    out = run(
        [sys.executable, "-m", "gptcore.chat", "--checkpoint", "ckpt.pt", "--max-new-tokens", "8"],
        tmp_path,
        input="All: Speak.\n/help\n",
        env=env_for(tmp_path),
    )
    assert "commands:" in out.stdout and "Traceback" not in out.stderr
    bad = run(
        [sys.executable, "-m", "gptcore.chat", "--checkpoint", "missing.pt"],
        tmp_path,
        check=False,
        env=env_for(tmp_path),
    )
    assert bad.returncode == 2 and "missing.pt: checkpoint not found" in bad.stderr
    bad = run(
        [sys.executable, "-m", "gptcore.chat", "--checkpoint", "ckpt.pt", "--top-p", "1.5"],
        tmp_path,
        check=False,
        env=env_for(tmp_path),
    )
    assert bad.returncode == 2 and "sample.top_p: Input should be less than or equal to 1, got 1.5" in bad.stderr


class ScriptedDecoder:
    """Stands in for a Decoder: streams fixed tokens, as `Decoder.stream` does, one (1, 1) tensor each."""

    device = torch.device("cpu")
    block = 32

    def __init__(self, tokens):
        self.tokens = tokens

    def stream(self, idx, max_new_tokens):
        for token in self.tokens[:max_new_tokens]:
            yield torch.tensor([[token]])


def test_streamed_bpe_text_never_shows_half_a_character():
    """Byte-level BPE splits 'é' and '日' into tokens of one byte each: the piece streamed for the first byte
    would be a replacement character. Each piece must be whole characters and the pieces the whole text."""
    vocab = BPETokenizer.train("hello world " * 50, 300)
    text = "héllo ¿qué? 日本"
    tokens = vocab.encode(text)
    assert any(vocab.decode([t]) == "\ufffd" for t in tokens)  # the case under test occurs
    pieces = list(stream_text(ScriptedDecoder(tokens), vocab, [0], len(tokens)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) < len(tokens)  # the split characters came in one piece each


class Terminal(io.BytesIO):
    """A scripted stdin that says it is a terminal."""

    def isatty(self):
        return True


def test_in_a_terminal_the_bot_prompts_for_each_line_and_says_when_a_reply_hit_the_limit(tmp_path, monkeypatch, capsys):
    checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(sys, "stdin", Terminal(b"/max-new-tokens 3\nAll: Speak, speak.\n"))
    assert chat.main(["--params", str(ROOT / "params.yaml"), "--checkpoint", str(tmp_path / "ckpt.pt")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith(chat.PROMPT + "ok: ") and lines[2].startswith(chat.PROMPT)  # asked before each line
    assert out.count(chat.PROMPT) == 3 and out.endswith(chat.PROMPT + "\n")  # and at end of input, then a new line
    assert lines[-2] == chat.CUT.format(n=3)  # three tokens, no end of a speech: the reply was cut, and it says so


def test_a_reply_that_stops_at_the_limit_says_so_and_one_that_ends_its_speech_does_not():
    vocab = CharTokenizer.from_text(SPEECHES)
    tokens = vocab.encode("Speak, speak.\n\nAll:")
    ended = chat.Reply(ScriptedDecoder(tokens), vocab, "All:\n", len(tokens))
    assert "".join(ended) == "Speak, speak.\n" and not ended.cut  # up to the blank line
    cut = chat.Reply(ScriptedDecoder(tokens), vocab, "All:\n", 5)
    assert "".join(cut) == "Speak" and cut.cut
    assert chat.CUT.format(n=5) == "[the reply stopped at max-new-tokens (5); /max-new-tokens N for longer ones]"
