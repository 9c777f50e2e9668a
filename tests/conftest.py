import pytest
import torch


def cpu_and_cuda():
    """Device parametrisation: the CUDA case is always listed and skipped without a GPU."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
