"""Sample stage: generate text from a checkpoint with the reference or the cuTile model, decoding
incrementally with a KV cache; write the samples (samples/samples.txt), metrics/sample.json and MLflow.

    python -m gptcore sample                                         # as `dvc repro` runs it
    GPTCORE_MLFLOW=off python -m gptcore sample --preset shakespeare_char --backend cutile
    python -m gptcore sample --prompt "ROMEO:" --num-samples 2 --max-new-tokens 500 --top-p 0.95

Run by hand in a terminal, the text streams to the console as it is generated.
"""

import sys
import time

import torch

from gptcore import stage
from gptcore.checkpoint import CheckpointError, load_checkpoint
from gptcore.devices import resolve_device, resolve_dtype
from gptcore.errors import DataError, ParamsError
from gptcore.files import atomic_write_text
from gptcore.manifest import checkpoint_tags
from gptcore.sampling import Decoder, load_for_inference, stream_text
from gptcore.tokenizer import from_json as tokenizer_from_json
from gptcore.tokenizer import load as load_tokenizer

SECTION = "sample"
SECTIONS = ["data", "sample"]


def parse_args(argv):
    ap = stage.parser(__doc__, SECTION)
    ap.add_argument("--out", default="samples/samples.txt", help="the samples file (default: %(default)s)")
    ap.add_argument("--checkpoint", help="sample.checkpoint")
    ap.add_argument("--backend", choices=["torch", "cutile"], help="sample.backend")
    ap.add_argument("--device", help="sample.device: auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", help="sample.dtype: auto | float32 | bfloat16 | float16")
    ap.add_argument("--prompt", help="sample.prompt")
    ap.add_argument("--num-samples", type=int, dest="num_samples", help="sample.num_samples")
    ap.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="sample.max_new_tokens")
    ap.add_argument("--temperature", type=float, help="sample.temperature (0: greedy)")
    ap.add_argument("--top-k", type=int, dest="top_k", help="sample.top_k")
    ap.add_argument("--top-p", type=float, dest="top_p", help="sample.top_p")
    ap.add_argument("--seed", type=int, help="sample.seed")
    ap.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_const",
        const=False,
        help="decode eagerly (sample.cuda_graph: false)",
    )
    return ap.parse_args(argv)


FLAGS = (
    "checkpoint",
    "backend",
    "device",
    "dtype",
    "prompt",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "cuda_graph",
)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = stage.load(args, SECTION, {k: getattr(args, k) for k in FLAGS}, sections=SECTIONS)
    s = params.sample
    root = stage.workspace()
    device = resolve_device(s.device, "sample.device")
    dtype = resolve_dtype(s.dtype, device)

    if not s.prompt:
        raise ParamsError(
            "sample.prompt: must not be empty (the model needs one token to start from; nanoGPT's default is a newline)"
        )
    ckpt_path = root / s.checkpoint
    checkpoint = load_checkpoint(ckpt_path)  # checked against its manifest (out/ckpt.json) when it has one
    ckpt_tags = checkpoint_tags(ckpt_path)
    # The checkpoint's own tokenizer; the prepared data's for one that carries none (nanoGPT's, older ones).
    if isinstance(checkpoint.get("tokenizer"), str):
        vocab, vocab_source = tokenizer_from_json(checkpoint["tokenizer"], str(ckpt_path)), str(ckpt_path)
    else:
        vocab, vocab_source = load_tokenizer(root / params.data.out_dir), f"{params.data.out_dir}/tokenizer.json"
    vocab_size = checkpoint["model_args"].get("vocab_size")
    if vocab_size != vocab.vocab_size:
        raise CheckpointError(
            f"{ckpt_path}: trained with a vocabulary of {vocab_size} tokens, but {vocab_source} has "
            f"{vocab.vocab_size}: not the same tokenizer"
        )
    try:
        prompt_ids = vocab.encode(s.prompt)
    except DataError as e:
        raise ParamsError(f"sample.prompt {s.prompt!r}: {e}") from None
    model = load_for_inference(checkpoint, s.backend, device, dtype)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    decoder = Decoder(model, 1, s.temperature, s.top_k, s.top_p, generator, cuda_graph=s.cuda_graph)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    stream = sys.stdout.isatty()  # by hand: text as it comes; under DVC or a pipe: each sample whole

    with stage.tracked("sample", params, SECTIONS) as run:
        texts, seconds = [], []
        for i in range(s.num_samples):
            header = f"==> sample {i + 1} of {s.num_samples} <=="
            print(header)
            if stream:
                print(s.prompt, end="", flush=True)
            t0 = time.perf_counter()
            if stream:
                pieces = [s.prompt]
                for piece in stream_text(decoder, vocab, prompt_ids, s.max_new_tokens):
                    print(piece, end="", flush=True)
                    pieces.append(piece)
                text = "".join(pieces)
            else:
                text = vocab.decode(decoder.generate(idx, s.max_new_tokens)[0].tolist())  # waits for the GPU
            seconds.append(time.perf_counter() - t0)
            print("" if stream else text)
            texts.append(f"{header}\n{text}\n")

        samples_text = "\n".join(texts)
        atomic_write_text(root / args.out, samples_text)
        total = s.num_samples * s.max_new_tokens
        # The first sample also runs each decode step eagerly once and captures it as a CUDA graph; the
        # later ones replay the graphs: their speed is the steady state.
        steady = seconds[1:] or seconds
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        metrics = {
            "tokens_generated": total,
            "tokens_per_sec": total / sum(seconds),
            "ms_per_token": 1000 * sum(seconds) / total,
            "steady_tokens_per_sec": len(steady) * s.max_new_tokens / sum(steady),
            "first_sample_sec": seconds[0],
            "cuda_graph_steps": len(decoder.graphs),  # decode steps replayed as CUDA graphs (0: eager)
        }
        stage.write_metrics("sample", metrics, root)
        run.log_metrics(metrics)
        run.set_tags(
            {
                "sample.backend": s.backend,
                "sample.device": device_name,
                "sample.dtype": str(dtype).removeprefix("torch."),
                "sample.file": args.out,
                "sample.cuda_graph_error": decoder.graph_error or "",
                **ckpt_tags,
            }
        )
        run.log_text(samples_text, "samples.txt")
    print(
        f"sample: {s.num_samples} samples of {s.max_new_tokens} tokens -> {args.out}; "
        f"{metrics['steady_tokens_per_sec']:,.0f} tokens/s ({s.backend} on {device_name}"
        f"{', CUDA graphs' if decoder.use_graph else ''})"
    )
    if decoder.graph_error and device.type == "cuda":
        print(f"note: decoding ran without CUDA graphs: {decoder.graph_error}", file=sys.stderr)
    return 0
