"""Which torch device a stage runs on: one rule for every `*.device` parameter."""

from __future__ import annotations

import torch

from gptcore.params import ParamsError


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
