"""Fixtures every test file may use, and the one rule for GPU tests: skipped with the reason where the cuTile
kernels cannot run."""

import pytest
from pipeline_helpers import write_corpus

from gptcore import data
from gptcore.kernels.runtime import cutile_unavailable


@pytest.fixture
def root(tmp_path):
    """A project folder with a small corpus prepared as character tokens under data/."""
    write_corpus(tmp_path / "corpus.txt")
    data.prepare("corpus.txt", tmp_path / "data", 0.1, root=tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config, items):
    reason = cutile_unavailable()  # why the GPU tests cannot run here, or None when they can
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
