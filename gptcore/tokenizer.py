"""Tokenizers: text to token ids and back.

    char   one token per character of the corpus (nanoGPT's shakespeare_char)
    bpe    byte-level BPE (GPT-2's kind), trained on the training split with Hugging Face `tokenizers`
    PATH   a tokenizer.json of Hugging Face `tokenizers` that the user brings (GPT-2's, say)

Every tokenizer serialises to one self-contained JSON string (`to_json`, `from_json`): the prepare stage
writes it to <data>/tokenizer.json, and it travels inside every checkpoint, so a checkpoint decodes and
encodes without the data folder. For BPE the model's vocabulary is the tokenizer's rounded up to a multiple
of 64 (nanoGPT's 50257 -> 50304: faster matrix products; the padded ids never occur in the data); a trained
BPE's is at least data.vocab_size, so GPT-2 small keeps its 50304 rows on a corpus too small to learn that
many tokens (prepare says so, and meta.json records the tokens learned). A tokenizer.json you bring keeps its
own size. Token files are uint16 while the vocabulary fits, uint32 beyond.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gptcore.errors import CheckpointError, DataError, ParamsError

FILE = "tokenizer.json"
KINDS = ("char", "bpe")
UINT16_VOCAB = 1 << 16  # ids below this fit uint16 token files
BYTES = 256  # byte-level BPE starts from every byte, whatever the corpus holds


def not_utf8(text: str, err: UnicodeEncodeError) -> DataError:
    """Bytes that were not UTF-8 where the text came from (Python keeps them as lone surrogates, U+DC80..U+DCFF,
    from a command line or a terminal) cannot be tokenised: name the first one and where it is."""
    c = ord(text[err.start])
    what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
    return DataError(f"not UTF-8 text: {what} at character {err.start}")


class Tokenizer:
    """What the pipeline needs of a tokenizer; `kind` names the implementation."""

    kind: str

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding: every id this tokenizer can produce is below it."""
        raise NotImplementedError

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= UINT16_VOCAB else np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]  # accepts lists, numpy arrays and tensors alike
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})  # negative ids would wrap silently
        if bad:
            raise DataError(f"token ids outside the vocabulary (size {self.vocab_size}): {bad[:20]}")
        return ids


class CharTokenizer(Tokenizer):
    """One token per character. `itos` is sorted when built from a text, so the ids are deterministic."""

    kind = "char"

    def __init__(self, itos: list[str]):
        if any(not isinstance(c, str) or len(c) != 1 for c in itos):
            raise DataError("vocabulary: every entry of itos must be a single character")
        if len(set(itos)) != len(itos):
            raise DataError("vocabulary: itos has repeated characters")
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        # Code points in sorted order and the id of each: encoding a whole corpus is one searchsorted
        # instead of a Python loop over millions of characters.
        codepoints = np.array([ord(c) for c in self.itos], dtype=np.uint32)
        self._order = np.argsort(codepoints, kind="stable").astype(self.token_dtype)
        self._sorted_codepoints = codepoints[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode_array(self, text: str) -> np.ndarray:
        """The token ids of `text`; a clear error names characters not in the vocabulary."""
        try:
            codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError as e:
            raise not_utf8(text, e) from None
        pos = np.searchsorted(self._sorted_codepoints, codepoints)
        pos = np.minimum(pos, max(self.vocab_size - 1, 0))
        known = self._sorted_codepoints[pos] == codepoints if self.vocab_size else np.zeros(len(codepoints), bool)
        if not known.all():
            missing = sorted({chr(c) for c in codepoints[~known].tolist()})
            shown = ", ".join(repr(c) for c in missing[:20]) + (", ..." if len(missing) > 20 else "")
            raise DataError(
                f"characters not in the vocabulary: {shown} ({len(missing)} distinct; the vocabulary has "
                f"{self.vocab_size})"
            )
        return self._order[pos]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in self.check_ids(ids))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "itos": self.itos}, ensure_ascii=False)


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (byte-level BPE when gptcore trains it)."""

    kind = "bpe"

    def __init__(self, hf, vocab_size: int = 0):
        # vocab_size: the rows at least (a trained BPE: data.vocab_size; a saved one: the rows it records)
        self.hf = hf
        self._vocab_size = max(round_up(self.tokens), vocab_size)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Byte-level BPE on `text` with up to `vocab_size` tokens (the 256 bytes first, so any text encodes).
        Deterministic: the same text and size give the same merges."""
        from tokenizers import Tokenizer as HF
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        hf.train_from_iterator(text.splitlines(keepends=True), trainer)
        return cls(hf, vocab_size)

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HF

        try:
            return cls(HF.from_file(str(path)))
        except Exception as e:  # tokenizers raises its own exception type for a file it cannot read
            raise DataError(f"{path}: not a tokenizer.json of Hugging Face tokenizers: {e}") from None

    @property
    def tokens(self) -> int:
        """Ids the tokenizer itself produces (its vocabulary before padding)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_array(self, text: str) -> np.ndarray:
        try:
            text.encode("utf-8")  # tokenizers refuses lone surrogates with a bare TypeError
        except UnicodeEncodeError as e:
            raise not_utf8(text, e) from None
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=self.token_dtype)

    def decode(self, ids) -> str:
        return self.hf.decode(self.check_ids(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "vocab_size": self.vocab_size, "hf": json.loads(self.hf.to_str())}, ensure_ascii=False
        )


def from_json(text: str, source: str = "tokenizer") -> Tokenizer:
    """The tokenizer a `to_json` string describes (from a checkpoint or <data>/tokenizer.json)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: the tokenizer is not JSON: {e}") from None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("itos"), list):
        return CharTokenizer(spec["itos"])
    if kind == "bpe" and isinstance(spec.get("hf"), dict):
        from tokenizers import Tokenizer as HF

        return BPETokenizer(HF.from_str(json.dumps(spec["hf"])), int(spec.get("vocab_size", 0)))
    raise DataError(f"{source}: not a gptcore tokenizer (expected kind 'char' with 'itos', or 'bpe' with 'hf')")


def train_bpe(train_text: str, vocab_size: int) -> BPETokenizer:
    """BPE of up to `vocab_size` tokens on the training split, with `vocab_size` rows at least. A size no corpus
    of this many bytes can yield is refused before training; one this corpus does not yield is said in one
    line (the rows beyond the tokens learned are never used)."""
    n_bytes = len(train_text.encode("utf-8"))
    most = BYTES + max(n_bytes - 1, 0)  # a merge joins two tokens of a word: at most one per byte after the first
    if vocab_size > most:
        raise ParamsError(
            f"data.vocab_size: {vocab_size:,} is more than byte-level BPE can learn from the training split "
            f"({n_bytes:,} bytes: {BYTES} byte tokens and at most one merge per further byte, {most:,} in all); "
            "lower data.vocab_size"
        )
    bpe = BPETokenizer.train(train_text, vocab_size)
    if bpe.tokens < vocab_size:
        print(
            f"warning: data.vocab_size: {vocab_size:,} asked, but BPE learned {bpe.tokens:,} tokens from the "
            f"training split (no pair left to merge); the model keeps {bpe.vocab_size:,} rows, "
            f"{bpe.vocab_size - bpe.tokens:,} of them never used (a smaller data.vocab_size drops them)",
            file=sys.stderr,
        )
    return bpe


def build(spec: str, train_text: str, vocab_size: int, root: Path | None = None) -> Tokenizer:
    """The BPE tokenizer `data.tokenizer` asks for: `bpe` (trained on the training split, up to `vocab_size`
    tokens) or the path of a tokenizer.json (relative paths from `root`), used as it is. (`char` is
    CharTokenizer.from_text of the whole corpus.)"""
    if spec == "bpe":
        return train_bpe(train_text, vocab_size)
    path = Path(spec)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.is_file():
        raise DataError(f"data.tokenizer: {spec!r} is neither char, bpe nor a tokenizer.json file ({path} not found)")
    return BPETokenizer.from_file(path)


def save(tokenizer: Tokenizer, folder: Path, write) -> None:
    """<folder>/tokenizer.json (the tokenizer) and <folder>/meta.json (what the token files hold), through
    `write(path, bytes)`, an atomic writer."""
    meta = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "dtype": tokenizer.token_dtype.name}
    if isinstance(tokenizer, BPETokenizer):  # the tokens it produces, before the padding to a multiple of 64
        meta["tokens"] = tokenizer.tokens
    if isinstance(tokenizer, CharTokenizer):  # nanoGPT's meta.json fields, for its tools
        meta.update(itos=tokenizer.itos, stoi=tokenizer.stoi)
    write(Path(folder) / FILE, tokenizer.to_json().encode("utf-8"))
    write(Path(folder) / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))


def load(folder: Path) -> Tokenizer:
    """The tokenizer of prepared data: <folder>/tokenizer.json, or a meta.json with `itos` alone (data
    prepared before tokenizer.json existed)."""
    folder = Path(folder)
    if (folder / FILE).is_file():
        return from_json((folder / FILE).read_text(encoding="utf-8"), str(folder / FILE))
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: run the prepare stage first (python -m gptcore prepare)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is not a readable vocabulary (JSON): {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), list):
        raise DataError(f"{meta_path}: expected a JSON object with an 'itos' list")
    tokenizer = CharTokenizer(meta["itos"])
    if meta.get("vocab_size") != tokenizer.vocab_size or meta.get("stoi", tokenizer.stoi) != tokenizer.stoi:
        raise DataError(f"{meta_path}: vocab_size / stoi disagree with itos; rerun the prepare stage")
    return tokenizer


# ---- the tokenizer of a checkpoint -------------------------------------------------------------------------


def check_vocab(checkpoint: str | Path, model_vocab: int, tokenizer_vocab: int, source: str) -> None:
    """The model's embedding has a row for every id of the tokenizer from `source` (and no more)."""
    if model_vocab != tokenizer_vocab:
        raise CheckpointError(
            f"{checkpoint}: vocab_size mismatch: the checkpoint's model has {model_vocab} tokens, {source} has "
            f"{tokenizer_vocab}: it was trained with another tokenizer (prepare its data, or point data.out_dir "
            "at that data)"
        )


def for_checkpoint(
    checkpoint: str | Path, model_vocab: int, carried: str | None, data_dir: str | Path | None = None
) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: the one it carries (`carried`, its JSON), else, for one
    that carries none (nanoGPT's), the prepared data's in `data_dir`; checked against the model's vocabulary."""
    if carried is not None:
        tokenizer, source = from_json(carried, str(checkpoint)), "the tokenizer it carries"
    elif data_dir is not None:
        try:
            tokenizer, source = load(data_dir), f"the prepared data ({data_dir})"
        except DataError as e:
            raise DataError(f"{checkpoint} carries no tokenizer, and the prepared data's cannot be read: {e}") from None
    else:
        raise DataError(f"{checkpoint} carries no tokenizer, and no prepared data was given to take one from")
    check_vocab(checkpoint, model_vocab, tokenizer.vocab_size, source)
    return tokenizer
