"""What every cuTile kernel shares at run time: whether cuTile can run here (the one rule), the dtypes the
attention kernels take, the GPU architecture that keys the tile tables, and the raw stream and context a
launch needs. Importing this module never imports cuda.tile."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from gptcore.errors import BackendUnavailable

ATTENTION_DTYPES = (torch.bfloat16, torch.float16)  # the flash kernels' matrix products run in half precision
LAYER_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _machine_reason() -> str | None:
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


def cutile_unavailable(device: torch.device | str | None = None) -> str | None:
    """None when the cuTile kernels can run here (on `device`, when given), otherwise the reason why not."""
    reason = _machine_reason()
    if reason is None and device is not None and torch.device(device).type != "cuda":
        reason = f"the cuTile kernels run on a CUDA device, not on {torch.device(device).type}"
    return reason


def require_cutile(device: torch.device | str | None = None) -> None:
    """Raise BackendUnavailable with the reason when the cuTile kernels cannot run (never fall back to PyTorch)."""
    reason = cutile_unavailable(device)
    if reason is not None:
        raise BackendUnavailable(f"backend 'cutile' cannot run: {reason}. Use backend 'torch' on this machine.")


def attention_dtype_unsupported(dtype: torch.dtype) -> str | None:
    """None when the cuTile attention kernels take `dtype`, otherwise why not."""
    if dtype in ATTENTION_DTYPES:
        return None
    return (
        f"the cuTile attention kernels run in bfloat16 or float16, not {str(dtype).removeprefix('torch.')}; "
        "cast to one of them or use autocast"
    )


def attention_head_dim_unsupported(head_dim: int) -> str | None:
    """None when the cuTile attention kernels take heads of this width, otherwise why not: the kernels' tiles
    are powers of two, so a multiple of 16 up to 128 is padded to the next one (48 runs as 64)."""
    if head_dim % 16 == 0 and 16 <= head_dim <= 128:
        return None
    return f"the cuTile attention kernels take head dims that are multiples of 16 up to 128, not {head_dim}"


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def launches_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel call may skip its custom operator and launch from an autograd.Function: not traced
    (torch.compile, export), and plain CUDA tensors (a FakeTensor or another subclass must see the operator).
    None stands for an absent optional tensor."""
    return not torch.compiler.is_compiling() and all(t is None or (type(t) in _PLAIN and t.is_cuda) for t in tensors)


@functools.cache
def arch_of(index: int) -> str:
    """The architecture (`sm_90`) of CUDA device `index`: the key of the tile tables."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def current_arch(device: torch.device | None = None) -> str:
    """The architecture of `device` or of the current CUDA device."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return arch_of(index)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def stream_handle(device_index: int) -> int:
    """The device's current CUDA stream as the raw handle ct.launch accepts: torch.cuda.current_stream()
    builds a Python object on every call, and the handle is all cuTile reads from it."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:  # pragma: no cover - a torch build without the private helper
        return torch.cuda.current_stream(device_index).cuda_stream
    return raw(device_index)


_thread_state = threading.local()


@functools.cache
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def ensure_cuda_context(device_index: int) -> None:
    """Make the device's primary CUDA context current on this thread, once per thread: autograd's backward
    thread may have none, and cuTile would then push and pop one around every launch."""
    if getattr(_thread_state, "device", None) == device_index:
        return
    try:
        cuda = _libcuda()
        current = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and not current.value:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            if (
                cuda.cuDeviceGet(ctypes.byref(dev), device_index) == 0
                and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
            ):
                cuda.cuCtxSetCurrent(ctx)
    except OSError:  # pragma: no cover - no driver library: the launch itself will say so
        return
    _thread_state.device = device_index
