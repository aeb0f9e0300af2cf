"""Shared test helpers: backend x device parametrization, poisoned allocations, fast SGD for tiny federations."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk

HAS_CUDA = torch.cuda.is_available()

# the default SGD (the paper's: lr 0.1, no momentum) learns the tests' tiny federations too slowly in a few rounds
FAST_SGD = ["lr=0.05", "momentum=0.9"]

# Which devices each backend runs on (triton on CPU only through the interpreter).
_BACKEND_DEVICES = {
    "reference": ("cpu", "cuda"),
    "cpp": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cpu", "cuda"),
}


def backend_device_params(op: str | None = None) -> list:
    """pytest params (backend, device) for every backend on every device it runs on; unusable ones skip."""
    params = []
    available = fk.available_backends(op)
    for backend, devices in _BACKEND_DEVICES.items():
        for device in devices:
            marks = []
            if device == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="needs a CUDA device"))
            elif not available[backend]:
                marks.append(pytest.mark.skip(reason=f"backend {backend} unavailable here"))
            elif backend == "triton" and device == "cpu" and HAS_CUDA:
                marks.append(pytest.mark.skip(reason="Triton runs on the GPU here, not the CPU interpreter"))
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


def poison_allocator(numel: int, dtype: torch.dtype, device: str, copies: int = 2) -> None:
    """Allocates and frees NaN-filled blocks of this size, so that an output allocated next likely reuses
    poisoned memory: an element a kernel forgets to write then shows up as NaN instead of a lucky zero."""
    if numel == 0:
        return
    blocks = [torch.full((numel,), float("nan"), dtype=dtype, device=device) for _ in range(copies)]
    del blocks
