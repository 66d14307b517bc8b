import pytest

from gptcore.kernels.runtime import cutile_unavailable


def pytest_collection_modifyitems(config, items):
    reason = cutile_unavailable()  # why the GPU tests cannot run here, or None when they can
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
