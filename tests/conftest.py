"""Shared pytest setup: GPU tests run only where a CUDA device and the CUDA build exist."""

import pytest
import torch


def _gpu_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from lplb import _C

    return bool(_C.has_cuda)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA build of lplb._C")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
