"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import torch
import triton.language as tl

from .._backends import triton_interpreted

ACCUMULATOR = {torch.float64: tl.float64}  # everything else accumulates in fp32


def accumulator(dtype: torch.dtype):
    return ACCUMULATOR.get(dtype, tl.float32)


def check_device(op: str, device: torch.device) -> None:
    """CPU tensors run only on the interpreter."""
    if device.type == "cpu" and not triton_interpreted():
        raise RuntimeError(f"{op}_triton: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                           "importing fedspa_kernels)")
