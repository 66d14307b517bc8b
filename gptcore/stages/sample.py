"""Sample stage: generate text from a checkpoint with the reference or the cuTile model, decoding
incrementally with a KV cache; write the samples (samples/samples.txt), metrics/sample.json and MLflow.

    python -m gptcore sample                                         # as `dvc repro` runs it
    GPTCORE_MLFLOW=off python -m gptcore sample --preset shakespeare_char --backend cutile
    python -m gptcore sample --prompt "ROMEO:" --num-samples 2 --max-new-tokens 500 --top-k off --top-p 0.95
    python -m gptcore sample --out /tmp/romeo.txt --prompt "ROMEO:"  # by hand: /tmp/romeo.txt{,.metrics.json}

Run by hand in a terminal, the text streams to the console as it is generated.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from gptcore import stage
from gptcore.checkpoint import check_finite, load_checkpoint
from gptcore.devices import dtype_name, resolve_device, resolve_dtype
from gptcore.errors import DataError, ParamsError
from gptcore.files import atomic_write_text
from gptcore.manifest import checkpoint_tags
from gptcore.model import GPT
from gptcore.params import OFF, SampleParams
from gptcore.sampling import Decoder, decoding_mode, load_for_inference, resolve_backend, stream_text
from gptcore.tokenizer import Tokenizer, for_checkpoint

SECTION = "sample"
SECTIONS = ["data", "sample"]
SAMPLES = Path("samples") / "samples.txt"
METRICS_SUFFIX = ".metrics.json"  # a hand run's metrics, beside its --out file


# ---- the options the sample stage and the chat bot share ------------------------------------------------


def int_or_off(text: str) -> int | str:
    return text if text == OFF else int(text)


def float_or_off(text: str) -> float | str:
    return text if text == OFF else float(text)


# Each sets the sample param of its name with dashes; a chat /command is the option's name (/top-k off).
SAMPLING_OPTIONS = {
    "max-new-tokens": (int, "sample.max_new_tokens: new tokens per sample (chat: at most, per turn)"),
    "temperature": (float, "sample.temperature (0: greedy)"),
    "top-k": (int_or_off, f"sample.top_k: keep the K most likely tokens ({OFF}: no top-k cut)"),
    "top-p": (float_or_off, f"sample.top_p: sample from the smallest set of tokens reaching P ({OFF}: no cut)"),
}
SHARED_FLAGS = ("checkpoint", "backend", "device", "dtype", "seed", "cuda_graph") + tuple(
    name.replace("-", "_") for name in SAMPLING_OPTIONS
)


def add_sampling_options(ap: argparse.ArgumentParser) -> None:
    """The options `python -m gptcore sample` and `python -m gptcore.chat` share (SHARED_FLAGS); each
    overrides the sample param it names."""
    ap.add_argument("--checkpoint", help="sample.checkpoint")
    ap.add_argument("--backend", choices=["auto", "torch", "cutile"], help="sample.backend")
    ap.add_argument("--device", help="sample.device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", help="sample.dtype: auto | float32 | bfloat16 | float16")
    for name, (parse, text) in SAMPLING_OPTIONS.items():
        ap.add_argument(f"--{name}", type=parse, dest=name.replace("-", "_"), help=text)
    ap.add_argument("--seed", type=int, help="sample.seed")
    ap.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_const",
        const=False,
        help="decode eagerly (sample.cuda_graph: false)",
    )


def open_checkpoint(path: Path, data_dir: Path) -> tuple[dict, Tokenizer]:
    """The checkpoint (checked against its manifest when it has one) and its tokenizer: the one it carries,
    else the prepared data's in `data_dir`."""
    checkpoint = load_checkpoint(path)
    check_finite(checkpoint.get("model") or {}, path)  # NaN weights would sample noise without a word
    vocab_size = checkpoint["model_args"].get("vocab_size")
    return checkpoint, for_checkpoint(path, vocab_size, checkpoint.get("tokenizer"), data_dir)


def decoder_for(model: GPT, s: SampleParams, generator: torch.Generator) -> Decoder:
    return Decoder(
        model,
        1,
        s.temperature,
        s.top_k,
        s.top_p,
        generator,
        cuda_graph=s.cuda_graph,
        tokens_per_graph=s.tokens_per_graph,
    )


def decode_path(backend: str, device: torch.device, dtype: torch.dtype, decoder: Decoder) -> str:
    """The decode path in words, for the first line a user sees: backend, device, dtype, graphs or eager."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return f"{backend} on {name}, {dtype_name(dtype)}, {decoding_mode(decoder)}"


# ---- the stage ---------------------------------------------------------------------------------------------


FLAGS = SHARED_FLAGS + ("prompt", "num_samples")


def parse_args(argv):
    ap = stage.parser(__doc__, SECTION, "python -m gptcore sample")
    ap.add_argument(
        "--out",
        metavar="FILE",
        help=f"a run by hand: the samples to FILE and its metrics beside it (FILE{METRICS_SUFFIX}), leaving the "
        f"pipeline's {SAMPLES} and metrics/sample.json as they are",
    )
    ap.add_argument("--prompt", help="sample.prompt")
    ap.add_argument("--num-samples", type=int, dest="num_samples", help="sample.num_samples")
    add_sampling_options(ap)
    return ap.parse_args(argv)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    try:
        return tokenizer.encode(prompt)
    except DataError as e:
        raise ParamsError(f"sample.prompt {prompt!r}: {e}") from None


def generate(decoder: Decoder, tokenizer: Tokenizer, s: SampleParams, prompt_ids: list[int]):
    """(each sample's text under its header, the seconds each took). Run by hand in a terminal the text
    streams as it comes; under DVC or a pipe each sample prints whole."""
    stream = sys.stdout.isatty()
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=decoder.device)
    texts, seconds = [], []
    for i in range(s.num_samples):
        header = f"==> sample {i + 1} of {s.num_samples} <=="
        print(header)
        if stream:
            print(s.prompt, end="", flush=True)
        t0 = time.perf_counter()
        if stream:
            pieces = [s.prompt]
            for piece in stream_text(decoder, tokenizer, prompt_ids, s.max_new_tokens):
                print(piece, end="", flush=True)
                pieces.append(piece)
            text = "".join(pieces)
        else:
            text = tokenizer.decode(decoder.generate(idx, s.max_new_tokens)[0].tolist())  # waits for the GPU
        seconds.append(time.perf_counter() - t0)
        print("" if stream else text)
        texts.append(f"{header}\n{text}\n")
    return texts, seconds


def speed_metrics(s: SampleParams, seconds: list[float], decoder: Decoder) -> dict:
    total = s.num_samples * s.max_new_tokens
    # The first sample also runs each decode step eagerly once and captures it as a CUDA graph; the
    # later ones replay the graphs: their speed is the steady state.
    steady = seconds[1:] or seconds
    return {
        "tokens_generated": total,
        "tokens_per_sec": total / sum(seconds),
        "ms_per_token": 1000 * sum(seconds) / total,
        "steady_tokens_per_sec": len(steady) * s.max_new_tokens / sum(steady),
        "first_sample_sec": seconds[0],
        "cuda_graph_steps": len(decoder.graphs),  # CUDA graphs of decode steps replayed (0: eager)
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args, SECTION, {k: getattr(args, k) for k in FLAGS}, sections=SECTIONS)
    s = params.sample
    root = stage.workspace()
    device = resolve_device(s.device, "sample.device")
    dtype = resolve_dtype(s.dtype, device)
    ckpt_path = root / s.checkpoint
    checkpoint, tokenizer = open_checkpoint(ckpt_path, root / params.data.out_dir)
    prompt_ids = encode_prompt(tokenizer, s.prompt)
    backend = resolve_backend(s.backend, device, dtype, s.cuda_graph)
    model = load_for_inference(checkpoint, backend, device, dtype)
    decoder = decoder_for(model, s, torch.Generator(device=device).manual_seed(s.seed))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"sample: {decode_path(backend, device, dtype, decoder)}")

    samples_path = root / (args.out or SAMPLES)
    with stage.tracked("sample", params, SECTIONS) as run:
        texts, seconds = generate(decoder, tokenizer, s, prompt_ids)
        samples_text = "\n".join(texts)
        atomic_write_text(samples_path, samples_text)
        metrics = speed_metrics(s, seconds, decoder)
        hand_run = samples_path.with_name(samples_path.name + METRICS_SUFFIX) if args.out else None
        metrics_path = stage.write_metrics("sample", metrics, root, hand_run)
        run.log_metrics(metrics)
        run.set_tags(
            {
                "sample.backend": backend,
                "sample.device": device_name,
                "sample.dtype": dtype_name(dtype),
                "sample.file": str(args.out or SAMPLES),
                "sample.cuda_graph_error": decoder.graph_error or "",
                **checkpoint_tags(ckpt_path),
            }
        )
        run.log_text(samples_text, "samples.txt")
    print(
        f"sample: {s.num_samples} samples of {s.max_new_tokens} tokens -> {args.out or SAMPLES}, "
        f"metrics {metrics_path.relative_to(root) if metrics_path.is_relative_to(root) else metrics_path}; "
        f"{metrics['steady_tokens_per_sec']:,.0f} tokens/s ({decode_path(backend, device, dtype, decoder)})"
    )
    if decoder.graph_error and device.type == "cuda":
        print(f"note: decoding ran without CUDA graphs: {decoder.graph_error}", file=sys.stderr)
    return 0
