"""`python -m gptcore STAGE [options]` runs a pipeline stage (as `dvc repro` does, without DVC), from any
folder; `python -m gptcore --help` lists the stages and the tools."""

from __future__ import annotations

import importlib
import sys

from gptcore import stage

STAGES = {
    "prepare": "the corpus as tokens (characters or BPE): data/{train,val}.bin, data/tokenizer.json",
    "train": "train the model: out/ckpt.pt with its manifest out/ckpt.json, out/last.pt",
    "transplant": "check a checkpoint, write the cuTile model's weights: cutile/model.safetensors",
    "verify": "the cuTile model against the reference, compile gate and L1-L5 (--checkpoint PATH: any checkpoint)",
    "bench": "cuTile against PyTorch on this machine: kernels, training step, prefill, decoding",
    "sample": "text from either model: samples/samples.txt",
}
COMMANDS = {  # python -m gptcore NAME, besides the stages: {name: its module}
    "compare": "gptcore.compare",
}
TOOLS = {
    "python -m gptcore compare": "the experiments side by side: params that differ, val loss, ms/iter, verify",
    "python -m gptcore.chat --checkpoint PATH": "talk to a model: it answers each speech you type, streaming",
    "python -m gptcore.presets NAME": "switch params.yaml to a preset (shakespeare_char, gpt2_small, tiny_cpu)",
    "python -m gptcore.release ARTIFACT... vX.Y.Z": "release a version (git tag + dvc push); --list lists them",
    "python -m gptcore.manifest FILE...": "check checkpoints against their manifests (sha256)",
    "python -m gptcore.tracking import FILE...": "put offline stage records (GPTCORE_MLFLOW=off) into MLflow",
    "python -m gptcore.kernels.compile": "compile every cuTile kernel signature ahead of time (no GPU needed)",
    "python -m gptcore.bench.tune": "sweep the kernels' tile configurations on a GPU",
    "python -m gptcore.bench.kernels": "the kernel tables on a GPU: eager, graph replay, host time",
}


def usage() -> str:
    lines = [
        "usage: python -m gptcore STAGE [options]   (python -m gptcore STAGE --help for its options)",
        "",
        "stages (each one of dvc.yaml; run in the folder whose params.yaml and files it uses):",
    ]
    lines += [f"  {name:12s} {text}" for name, text in STAGES.items()]
    lines += ["", "tools:"] + [f"  {cmd:46s} {text}" for cmd, text in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = argv[0]
    if name in COMMANDS:
        return importlib.import_module(COMMANDS[name]).main(argv[1:])
    if name not in STAGES:
        print(f"error: unknown stage {name!r}: expected one of {', '.join(STAGES)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"gptcore.stages.{name}")
    try:
        return stage.main(lambda: module.main(argv[1:]))
    except SystemExit as e:  # --help, or a usage error argparse reports itself
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
