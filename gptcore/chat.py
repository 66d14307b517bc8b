"""An interactive bot: type a speech, the model answers in the corpus's style, streaming as it goes.

    python -m gptcore.chat --checkpoint out/ckpt.pt [--backend cutile] [--temperature 0.8] [--top-k off]

It samples as the sample stage does, from the `sample` params of params.yaml (--params, --set and --preset as
every stage takes them), with the sample stage's options (--max-new-tokens, --temperature, --top-k, --top-p,
--checkpoint, --backend, ...) overriding them. Each line you type is a turn of the conversation ("ROMEO: But
soft!" becomes a speech of ROMEO's, in the corpus's shape); the model continues the conversation until the end
of a speech (a blank line) or --max-new-tokens, and the whole conversation stays its context, the last
block_size tokens of it as the window slides. Commands are the options' names: /temperature X, /top-k N|off,
/top-p X|off, /max-new-tokens N; and /reset, /help, /quit.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gptcore import stage
from gptcore.devices import resolve_device, resolve_dtype
from gptcore.errors import DataError, UserError
from gptcore.files import not_utf8
from gptcore.params import OFF, SampleParams, updated
from gptcore.sampling import Decoder, load_for_inference, resolve_backend, stream_text
from gptcore.stages.sample import (
    SAMPLING_OPTIONS,
    SECTION,
    SECTIONS,
    SHARED_FLAGS,
    add_sampling_options,
    decode_path,
    decoder_for,
    open_checkpoint,
)
from gptcore.tokenizer import Tokenizer

PROMPT = "> "  # before each line typed in a terminal
CUT = "[the reply stopped at max-new-tokens ({n}); /max-new-tokens N for longer ones]"
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]*[A-Za-z]):\s*(.*)$")  # "ROMEO: But soft!" -> ROMEO's speech
HELP = f"""commands:
  /temperature X       sampling temperature (0: greedy)
  /top-k N             keep the N most likely tokens (/top-k {OFF}: all)
  /top-p X             nucleus sampling at X (/top-p {OFF}: none)
  /max-new-tokens N    at most N new tokens a turn
  /reset               forget the conversation
  /help                this list
  /quit                leave (so does end of input)"""


def as_speech(line: str) -> str:
    """A turn in the corpus's shape: `NAME:` on its own line, the speech under it, a blank line after."""
    match = SPEAKER.match(line.strip())
    if match:
        return f"{match.group(1)}:\n{match.group(2)}\n\n"
    return line.strip() + "\n\n"


def describe(s: SampleParams) -> str:
    """The settings a /command changes, each by its option's name."""
    top_k, top_p = (OFF if v is None else v for v in (s.top_k, s.top_p))
    return f"temperature {s.temperature}, top-k {top_k}, top-p {top_p}, max-new-tokens {s.max_new_tokens}"


def apply_command(line: str, settings: SampleParams) -> tuple[SampleParams, str]:
    """The settings a /command makes of `settings` (unchanged if it is wrong), and the message to show."""
    name, _, value = line[1:].strip().partition(" ")
    value = value.strip()
    if name not in SAMPLING_OPTIONS:
        return settings, f"unknown command /{name}: /help lists them"
    parse = SAMPLING_OPTIONS[name][0]
    try:
        new = updated(settings, SECTION, **{name.replace("-", "_"): parse(value)})
    except ValueError as e:  # a value that does not parse, or a ParamsError naming the param
        return settings, f"/{name} {value}: {e}"
    return new, f"ok: {describe(new)}"


class Reply:
    """The model's turn after `conversation`, streamed as it is iterated, up to the end of its speech (a blank
    line) or `max_tokens`; once iterated, `cut` says whether it stopped at `max_tokens` inside the speech."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, conversation: str, max_tokens: int):
        self.decoder, self.tokenizer, self.conversation, self.max_tokens = decoder, tokenizer, conversation, max_tokens
        self.cut = False

    def __iter__(self) -> Iterator[str]:
        ids = self.tokenizer.encode(self.conversation)[-self.decoder.block :]
        text = ""
        for piece in stream_text(self.decoder, self.tokenizer, ids, self.max_tokens):
            start = len(text)
            text += piece
            end = text.find("\n\n", len(text) - len(text.lstrip("\n")))  # a blank line after the speech began
            if end >= 0:
                yield piece[: max(0, end - start)]
                return
            yield piece
        self.cut = True


def input_lines(stdin, prompt: str = "") -> Iterator[str | DataError]:
    """Each line typed, without its line end, `prompt` shown before each; a line that is not UTF-8 comes as the
    DataError that says what is wrong with it, so the bot refuses that line and goes on. Read as bytes where
    the stream has them: a text stream would stop the whole conversation at the first bad byte (or hand on what
    it cannot encode)."""
    lines = stdin.buffer if hasattr(stdin, "buffer") else stdin
    for number in itertools.count(1):
        if prompt:
            print(prompt, end="", flush=True)
        line = lines.readline()
        if not line:
            if prompt:
                print()  # end of input (Ctrl-D) at the prompt: the shell's own prompt starts on a line of its own
            return
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"line {number} is not UTF-8 text: {not_utf8(e)}; it was not sent")
                continue
        yield line.rstrip("\r\n")


def parse_args(argv):
    ap = stage.parser(__doc__, SECTION, "python -m gptcore.chat")
    add_sampling_options(ap)
    ap.add_argument(
        "--data", help="the prepared data whose tokenizer serves a checkpoint that carries none (default: data.out_dir)"
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = stage.load(args, SECTION, {k: getattr(args, k) for k in SHARED_FLAGS}, sections=SECTIONS)
        settings = params.sample
        device = resolve_device(settings.device, "sample.device")
        dtype = resolve_dtype(settings.dtype, device)
        checkpoint, tokenizer = open_checkpoint(Path(settings.checkpoint), Path(args.data or params.data.out_dir))
        backend = resolve_backend(settings.backend, device, dtype, settings.cuda_graph)
        model = load_for_inference(checkpoint, backend, device, dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    decoder = decoder_for(model, settings, generator)
    conversation = ""
    path = decode_path(backend, device, dtype, decoder)
    print(f"gptcore chat: {settings.checkpoint} ({path}); type a speech, /help for commands")
    for line in input_lines(sys.stdin, PROMPT if sys.stdin.isatty() else ""):  # piped: a clean transcript
        if isinstance(line, DataError):
            print(f"error: {line}")
            continue
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
                decoder = decoder_for(model, settings, generator)  # the settings are part of each captured step
            continue
        turn = as_speech(line)
        try:
            tokenizer.encode(turn)
        except DataError as e:  # a character the corpus never had, or not text: say so, keep the conversation
            print(f"error: {e}")
            continue
        conversation += turn
        answer, reply = "", Reply(decoder, tokenizer, conversation, settings.max_new_tokens)
        for piece in reply:
            print(piece, end="", flush=True)
            answer += piece
        print()
        if reply.cut:
            print(CUT.format(n=settings.max_new_tokens))
        conversation += answer.strip("\n") + "\n\n"
    return 0


if __name__ == "__main__":
    sys.exit(main())
