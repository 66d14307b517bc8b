import pytest
import torch


def cuda_skip_reason() -> str | None:
    """Why the cuTile GPU tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine: the cuTile kernels need one"
    try:
        import cuda.tile  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the machine
        return f"cuda.tile is not importable: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
