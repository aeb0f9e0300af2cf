"""The pattern check every kernel runs, as an op of its own:

    fedspa::check_csr(Tensor crow_indices, Tensor col_indices, int num_cols) -> ()

Raises ValueError naming the first offender unless (crow, col) is a valid CSR pattern with num_cols columns (see
``fedspa_kernels._checks``). C++ on the CPU (one parallel pass) and on CUDA (ATen ops) in csrc/cpu/check_csr.cpp;
the Python check otherwise. Every native kernel entry runs the same C++ check itself: this op lets it be called,
and timed, alone.
"""

from __future__ import annotations

import torch

from .._checks import check_csr, check_csr_metadata
from .._library import LIB, define


def check_csr_reference(crow_indices: torch.Tensor, col_indices: torch.Tensor, num_cols: int) -> None:
    check_csr_metadata("check_csr", crow_indices, col_indices, crow_indices.device)
    check_csr("check_csr", crow_indices, col_indices, num_cols)


define("check_csr", "(Tensor crow_indices, Tensor col_indices, int num_cols) -> ()")
LIB.impl("check_csr", check_csr_reference, "CompositeExplicitAutograd")
torch.library.register_fake("fedspa::check_csr", lambda crow_indices, col_indices, num_cols: None, lib=LIB)
