"""cuTile kernels of gptcore: LayerNorm and causal flash attention, forward and backward.

Importing this package works on any machine; cuda.tile is imported only when a kernel is called.
Without a CUDA GPU (or without cuda.tile) every call raises a RuntimeError that says why: there is
no silent fallback to PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import threading

__all__ = ["layer_norm", "causal_attention", "cutile_available", "arch_of", "current_arch", "ensure_cuda_context",
           "stream_handle"]


@functools.lru_cache(maxsize=None)
def cutile_available() -> str | None:
    """None when the cuTile kernels can run here, otherwise the reason they cannot (checked once)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return f"torch is not importable: {e}"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        import cuda.tile  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason
        return f"cuda.tile cannot be imported: {type(e).__name__}: {e}"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"cuTile needs compute capability 8.0 or newer, this GPU has {major}.x"
    return None


@functools.lru_cache(maxsize=None)
def arch_of(index: int) -> str:
    """The architecture (`sm_90`) of CUDA device `index`: the key of the tile tables."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def current_arch(device=None) -> str:
    """The architecture of `device` or the current CUDA device."""
    import torch

    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return arch_of(index)


def stream_handle(device_index: int) -> int:
    """The current CUDA stream of a device as the raw handle ct.launch accepts.

    torch.cuda.current_stream() builds a Python Stream object on every call (microseconds of host time
    per launch); the raw handle is what cuTile reads from it anyway.
    """
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:  # pragma: no cover - a torch build without the private helper
        return torch.cuda.current_stream(device_index).cuda_stream
    return raw(device_index)


_thread_state = threading.local()


@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def ensure_cuda_context(device_index: int) -> None:
    """Make the device's primary CUDA context current on this thread, once per thread.

    PyTorch runs backward passes on its own worker thread, which may have no current driver context;
    cuTile then pushes and pops the context around every launch there, and torch re-binds it later
    (with a "no current CUDA context" warning). Binding the primary context once, as torch itself does
    lazily, avoids both. On the H100 the measured effect on host time was within noise.
    """
    if getattr(_thread_state, "device", None) == device_index:
        return
    try:
        cuda = _libcuda()
        current = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and not current.value:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            if (cuda.cuDeviceGet(ctypes.byref(dev), device_index) == 0
                    and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0):
                cuda.cuCtxSetCurrent(ctx)
    except OSError:  # pragma: no cover - no driver library: the launch itself will say so
        return
    _thread_state.device = device_index


def _require(what: str) -> None:
    reason = cutile_available()
    if reason is not None:
        raise RuntimeError(f"cuTile {what} cannot run: {reason}")


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dimension (as F.layer_norm with normalized_shape=(N,)), on cuTile."""
    _require("layer_norm")
    from gptcore.kernels.layernorm import layer_norm as _impl
    return _impl(x, weight, bias, eps)


def causal_attention(q, k, v, scale: float | None = None):
    """Causal flash attention, q (B, H, Tq, D), k/v (B, H, Tk, D), Tq <= Tk, on cuTile."""
    _require("causal_attention")
    from gptcore.kernels.attention import causal_attention as _impl
    return _impl(q, k, v, scale)
