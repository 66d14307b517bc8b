"""Will a model train in this machine's memory? An estimate from the config and the batch, made before anything
is allocated, so that a model that cannot fit is refused in one line instead of dying in the allocator.

The estimate is a floor, not a forecast: the weights, their gradients and AdamW's two moments (fp32, 16 bytes a
parameter) are exact; the activations count only what the backward pass needs in every mode, eager or
compiled, so a run refused here could not have run, while one let through may still be tight.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptcore.errors import ParamsError
from gptcore.model import GPT, GPTConfig

STATE_BYTES = 16  # per parameter: fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
# Per token and layer, in units of n_embd: the outputs of q/k/v, attention and the MLP's 4x projection, which
# the backward pass needs and torch.compile never recomputes (matmuls and attention); eager keeps more.
SAVED_PER_LAYER = 3 + 1 + 4
GIB = 1 << 30


def n_params(config: GPTConfig) -> int:
    """The model's parameters (the tied embedding once), counted on the meta device: no memory is touched."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def training_bytes(config: GPTConfig, batch_size: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(parameters, bytes of weights + gradients + optimizer state, bytes of activations of one micro-batch: the
    saved layer outputs and the logits, which exist together at the end of the forward pass)."""
    params = n_params(config)
    tokens = batch_size * config.block_size
    act = torch.finfo(dtype).bits // 8  # autocast computes these in the compute dtype
    activations = tokens * act * (config.n_layer * SAVED_PER_LAYER * config.n_embd + config.vocab_size)
    return params, params * STATE_BYTES, activations


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What a container's memory limit (cgroup v2) leaves, which /proc/meminfo does not show."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(free bytes on `device`, where the figure comes from); None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return None, ""
    figures = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return (min(figures), "available RAM") if figures else (None, "")


def check_fits(config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a model whose training state and activations cannot fit in `device`'s free memory, naming the
    params that set the size, the estimate and what is free."""
    params, state, activations = training_bytes(config, batch_size, dtype)
    free, source = available_bytes(device)
    if free is None or state + activations <= free:
        return
    raise ParamsError(
        f"model too large for {device} memory: model.n_layer={config.n_layer}, model.n_embd={config.n_embd} and "
        f"vocab {config.vocab_size} give {params:,} parameters: {state / GIB:,.1f} GiB for weights, gradients and "
        f"AdamW state ({STATE_BYTES} bytes each) plus at least {activations / GIB:,.1f} GiB of activations at "
        f"train.batch_size={batch_size} x model.block_size={config.block_size}, {(state + activations) / GIB:,.1f} "
        f"GiB in all, against {free / GIB:,.1f} GiB {source}; make the model or the batch smaller"
    )
