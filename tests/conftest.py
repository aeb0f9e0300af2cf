"""Test setup: Triton runs on its CPU interpreter when there is no GPU (set before any kernel is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if "FEDSPA_CACHE_DIR" not in os.environ:  # the measured layer choices of this session, not the user's cache
    import tempfile

    os.environ["FEDSPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedspa-test-cache-")

import fedspa_kernels  # noqa: E402,F401  (loads the extension after TRITON_INTERPRET is set)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)
    yield
