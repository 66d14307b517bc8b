"""Which torch device and autocast dtype a stage runs with: one rule for every `*.device` and `*.dtype`
parameter, the one map between dtype names and torch dtypes, and the one autocast helper."""

from __future__ import annotations

import contextlib

import torch

from gptcore.errors import ParamsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # as params.yaml names them


def resolve_device(name: str, key: str, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when present, else CPU. A CUDA device asked for on a machine without one, or a name
    torch does not know, is a ParamsError that names the parameter `key`. `local_rank`: under torchrun,
    each process takes its own GPU (`cuda` -> `cuda:<local_rank>`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"{key}: {name!r} asked for, but this machine has no CUDA GPU")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ParamsError(f"{key}: {name!r} is not a device ({e})") from None
    if device.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the GPU supports it, else fp16 (with a GradScaler); fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name params.yaml and the records use: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """The mixed precision training runs in: fp32 weights, matmuls (and the attention) in `dtype`; nothing
    for float32. `cache_enabled=False` inside a CUDA-graph capture: autocast's cache of weight casts lives
    across the ops of one region and must not be captured."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)
