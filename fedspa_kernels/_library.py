"""The `fedspa` operator namespace. Every op schema is defined here once, in Python; C++/CUDA files only
register kernels for these schemas (TORCH_LIBRARY_IMPL)."""

from __future__ import annotations

import torch

LIB = torch.library.Library("fedspa", "DEF")


def define(name: str, schema: str) -> str:
    """Defines `fedspa::{name}{schema}` and returns its qualified name."""
    LIB.define(name + schema)
    return f"fedspa::{name}"
