"""torch.utils.flop_counter counts fedspa's sparse ops by their stored nonzeros, forward and backward."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import fedspa_kernels as fk


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_sparse_linear_counts_2_nnz_per_column_forward_and_twice_that_backward():
    mask = torch.rand(37, 53) < 0.2
    S = fk.SparseMatrix.from_dense(torch.randn(37, 53), mask)
    S.values.requires_grad_()
    x = torch.randn(11, 53, requires_grad=True)
    nnz = int(mask.sum())
    assert _count(lambda: fk.sparse_linear(x, S)) == 2 * nnz * 11
    out = fk.sparse_linear(x, S)
    assert _count(lambda: out.sum().backward()) == 2 * (2 * nnz * 11)  # input gradient (SpMM) + weight gradient (SDDMM)
    assert _count(lambda: fk.sddmm(torch.randn(37, 9), torch.randn(9, 53), S)) == 2 * nnz * 9


def test_sparse_conv2d_counts_2_nnz_per_output_pixel_forward_and_twice_that_backward():
    mask = torch.rand(6, 4 * 3 * 3) < 0.3
    W = fk.SparseMatrix.from_dense(torch.randn(6, 36), mask)
    W.values.requires_grad_()
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    nnz = int(mask.sum())
    positions = 2 * 7 * 5  # batch x output pixels (stride 1, padding 1)
    assert _count(lambda: fk.sparse_conv2d(x, W, (3, 3), padding=1)) == 2 * nnz * positions
    out = fk.sparse_conv2d(x, W, (3, 3), padding=1)
    assert _count(lambda: out.sum().backward()) == 2 * (2 * nnz * positions)
