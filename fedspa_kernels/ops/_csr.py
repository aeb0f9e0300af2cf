"""Checks of CSR operands shared by the spmm/sddmm references and Triton launchers (the C++ kernels make the
same checks with the same messages, in csrc/include/fedspa/csr_checks.h)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_structure_metadata(op: str, crow: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None,
                             device: torch.device) -> None:
    """dtypes, dims and devices of a CSR structure (cheap, no data read)."""
    if crow.dtype != torch.int64 or crow.dim() != 1 or crow.numel() < 1:
        raise TypeError(f"{op}: crow_indices must be a non-empty 1-D int64 tensor, got {crow.dtype} of shape "
                        f"{tuple(crow.shape)}")
    if col.dtype != torch.int32 or col.dim() != 1:
        raise TypeError(f"{op}: col_indices must be a 1-D int32 tensor, got {col.dtype} of shape {tuple(col.shape)}")
    if perm is not None and (perm.dtype != torch.int32 or perm.dim() != 1 or perm.numel() != col.numel()):
        raise TypeError(f"{op}: perm must be a 1-D int32 tensor with one entry per nonzero ({col.numel()}), got "
                        f"{perm.dtype} of shape {tuple(perm.shape)}")
    for name, t in (("crow_indices", crow), ("col_indices", col), ("perm", perm)):
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the operands are on {device}")


def check_structure_values(op: str, crow: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None,
                           num_cols: int, num_values: int) -> None:
    """Reads the structure: pointers start at 0, never decrease and end at nnz; columns lie in [0, num_cols);
    perm is a permutation of [0, num_values). Raises ValueError naming the first offender."""
    nnz = col.numel()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz:
        raise ValueError(f"{op}: crow_indices must start at 0 and end at nnz={nnz}, got {int(crow[0])} and "
                         f"{int(crow[-1])}")
    drops = (crow[1:] < crow[:-1]).nonzero()
    if drops.numel():
        r = int(drops[0, 0])
        raise ValueError(f"{op}: crow_indices decreases at row {r}: {int(crow[r])} -> {int(crow[r + 1])}")
    bad = ((col < 0) | (col >= num_cols)).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise ValueError(f"{op}: col_indices[{k}] = {int(col[k])} is outside [0, {num_cols})")
    if perm is None:
        if num_values != nnz:
            raise ValueError(f"{op}: {num_values} values for {nnz} nonzeros")
        return
    if num_values != nnz:
        raise ValueError(f"{op}: perm needs as many values as nonzeros, got {num_values} values for {nnz} nonzeros")
    bad = ((perm < 0) | (perm >= num_values)).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise ValueError(f"{op}: perm[{k}] = {int(perm[k])} is outside [0, {num_values})")
    if nnz and int(torch.bincount(perm.long(), minlength=num_values).max()) != 1:
        raise ValueError(f"{op}: perm is not a permutation of [0, {num_values})")


def row_of_each_nonzero(crow: torch.Tensor) -> torch.Tensor:
    """The row index (int64) of every nonzero, in CSR order."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def check_transpose_pair(op: str, crow: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None,
                         tcrow: torch.Tensor, tcol: torch.Tensor, tperm: torch.Tensor | None, rows: int, cols: int,
                         num_values: int) -> None:
    """Both orders of a pattern are valid and hold the same (row, col) for every value index."""
    if crow.numel() != rows + 1 or tcrow.numel() != cols + 1:
        raise ValueError(f"{op}: crow_indices has {crow.numel()} entries and its transpose {tcrow.numel()}, expected "
                         f"{rows + 1} and {cols + 1} for a ({rows} x {cols}) pattern")
    if tcol.numel() != col.numel():
        raise ValueError(f"{op}: the pattern has {col.numel()} nonzeros but its transpose {tcol.numel()}")
    check_structure_values(op, crow, col, perm, cols, num_values)
    check_structure_values(op + " (transpose)", tcrow, tcol, tperm, rows, num_values)
    if not col.numel():
        return
    device = col.device

    def by_value(order: torch.Tensor | None, entries: torch.Tensor) -> torch.Tensor:
        out = torch.empty(num_values, dtype=torch.int64, device=device)
        where = torch.arange(num_values, device=device) if order is None else order.long()
        out[where] = entries.long()
        return out

    rows_1, cols_1 = by_value(perm, row_of_each_nonzero(crow)), by_value(perm, col)
    rows_2, cols_2 = by_value(tperm, tcol), by_value(tperm, row_of_each_nonzero(tcrow))
    bad = ((rows_1 != rows_2) | (cols_1 != cols_2)).nonzero()
    if bad.numel():
        v = int(bad[0, 0])
        raise ValueError(f"{op}: value {v} is at ({int(rows_1[v])}, {int(cols_1[v])}) in the pattern but at "
                         f"({int(rows_2[v])}, {int(cols_2[v])}) in its transpose")
