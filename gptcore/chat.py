"""An interactive bot: type a speech, the model answers in the corpus's style, streaming as it goes.

    python -m gptcore.chat --checkpoint out/ckpt.pt [--backend cutile] [--temperature 0.8] [--top-k 200]

Each line you type is a turn of the conversation ("ROMEO: But soft!" becomes a speech of ROMEO's, in the
corpus's shape); the model continues the conversation until the end of a speech (a blank line) or
--max-tokens, and the whole conversation stays its context, the last block_size tokens of it as the
window slides. Commands: /temp X, /top_k N|off, /top_p X|off, /max N, /reset, /help, /quit.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from gptcore.checkpoint import load_checkpoint
from gptcore.devices import resolve_device, resolve_dtype
from gptcore.errors import DataError, UserError
from gptcore.sampling import Decoder, load_for_inference, stream_text
from gptcore.tokenizer import Tokenizer
from gptcore.tokenizer import from_json as tokenizer_from_json
from gptcore.tokenizer import load as load_tokenizer

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]*[A-Za-z]):\s*(.*)$")  # "ROMEO: But soft!" -> ROMEO's speech
HELP = """commands:
  /temp X      sampling temperature (0: greedy)
  /top_k N     keep the N most likely tokens (/top_k off: all)
  /top_p X     nucleus sampling at X (/top_p off: none)
  /max N       at most N new tokens a turn
  /reset       forget the conversation
  /help        this list
  /quit        leave (so does end of input)"""


@dataclass
class Settings:
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int


def as_speech(line: str) -> str:
    """A turn in the corpus's shape: `NAME:` on its own line, the speech under it, a blank line after."""
    match = SPEAKER.match(line.strip())
    if match:
        return f"{match.group(1)}:\n{match.group(2)}\n\n"
    return line.strip() + "\n\n"


def checked(settings: Settings) -> Settings:
    """`settings`, or a ValueError that names the setting and the values it takes."""
    if settings.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {settings.temperature}")
    if settings.top_k is not None and settings.top_k < 1:
        raise ValueError(f"top_k must be at least 1 (off: no cut), got {settings.top_k}")
    if settings.top_p is not None and not 0 < settings.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (off: no cut), got {settings.top_p}")
    if settings.max_tokens < 1:
        raise ValueError(f"max (new tokens a turn) must be at least 1, got {settings.max_tokens}")
    return settings


def apply_command(line: str, settings: Settings) -> tuple[Settings, str]:
    """The settings a /command makes of `settings` (unchanged if it is wrong), and the message to show."""
    name, _, value = line[1:].strip().partition(" ")
    value = value.strip()
    fields = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "max": "max_tokens"}
    if name not in fields:
        return settings, f"unknown command /{name}: /help lists them"
    try:
        parse = {"temp": float, "top_k": int, "top_p": float, "max": int}[name]
        parsed = None if value == "off" and name in ("top_k", "top_p") else parse(value)
        new = checked(replace(settings, **{fields[name]: parsed}))
    except ValueError as e:
        return settings, f"/{name} {value}: {e}"
    return new, f"ok: temperature {new.temperature}, top_k {new.top_k}, top_p {new.top_p}, max {new.max_tokens}"


def reply(decoder: Decoder, tokenizer: Tokenizer, conversation: str, max_tokens: int) -> Iterator[str]:
    """The model's turn after `conversation`, streamed, up to the end of its speech (a blank line)."""
    ids = tokenizer.encode(conversation)[-decoder.block :]
    text = ""
    for piece in stream_text(decoder, tokenizer, ids, max_tokens):
        start = len(text)
        text += piece
        end = text.find("\n\n", len(text) - len(text.lstrip("\n")))  # a blank line after the speech began
        if end >= 0:
            yield piece[: max(0, end - start)]
            return
        yield piece


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint (its tokenizer travels in it)")
    ap.add_argument("--data", help="prepared data whose tokenizer to use, for a checkpoint that carries none")
    ap.add_argument("--backend", choices=["torch", "cutile"], default="torch")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=200, help="keep the K most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="decode eagerly on a GPU")
    args = ap.parse_args(argv)
    try:
        settings = checked(Settings(args.temperature, args.top_k or None, args.top_p, args.max_tokens))
    except ValueError as e:
        ap.error(str(e))
    try:
        device = resolve_device(args.device, "--device")
        dtype = resolve_dtype(args.dtype, device)
        checkpoint = load_checkpoint(args.checkpoint)
        if isinstance(checkpoint.get("tokenizer"), str):
            tokenizer = tokenizer_from_json(checkpoint["tokenizer"], args.checkpoint)
        elif args.data:
            tokenizer = load_tokenizer(args.data)
        else:
            raise DataError(f"{args.checkpoint} carries no tokenizer: pass --data DIR, the data it was trained on")
        model = load_for_inference(checkpoint, args.backend, device, dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def new_decoder() -> Decoder:  # the sampling settings are part of each captured step
        return Decoder(model, 1, settings.temperature, settings.top_k, settings.top_p, generator, args.cuda_graph)

    decoder = new_decoder()
    conversation = ""
    print(f"gptcore chat: {args.checkpoint} ({args.backend} on {device}); type a speech, /help for commands")
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if line.strip() == "/quit":
                break
            if line.strip() == "/help":
                print(HELP)
            elif line.strip() == "/reset":
                conversation = ""
                print("ok: the conversation starts afresh")
            else:
                settings, message = apply_command(line, settings)
                print(message)
                decoder = new_decoder()
            continue
        turn = as_speech(line)
        try:
            tokenizer.encode(turn)
        except DataError as e:  # a character the corpus never had: say so, keep the conversation
            print(f"error: {e}")
            continue
        conversation += turn
        answer = ""
        for piece in reply(decoder, tokenizer, conversation, settings.max_tokens):
            print(piece, end="", flush=True)
            answer += piece
        print()
        conversation += answer.strip("\n") + "\n\n"
    return 0


if __name__ == "__main__":
    sys.exit(main())
