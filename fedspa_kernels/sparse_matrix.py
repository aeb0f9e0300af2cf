"""SparseMatrix: a matrix with a fixed sparsity pattern (fixed nnz), as FedSpa's sparse layers hold them.

CSR only: ``crow_indices`` (int64, rows + 1), ``col_indices`` (nnz) and ``values`` (nnz, in row-major order). The
column indices are int16 when the matrix has at most 32768 columns (a linear layer's input features, a conv's
in_channels x kernel taps: every layer of fedspa's models), else int32: 2 (or 4) bytes of index per nonzero plus 8
per row. Every kernel of every backend reads both. No transposed copy of the pattern is kept: the kernels that
read a matrix column by column (S^T @ D, a convolution's input gradient) work from the CSR order itself (the C++
transposed SpMM scatters along the rows) or build the transposed order for the call (:meth:`transpose_pattern`
computes it for anyone who wants it).

Memory safety does not rest on this object: every kernel checks the pattern it is given (see
``fedspa_kernels._checks``), so a SparseMatrix whose index tensors were edited in place gives a clear error, not
an out-of-bounds access. Its fields cannot be reassigned; :meth:`validate` runs the full check.
"""

from __future__ import annotations

import torch

from ._checks import (FLOAT_DTYPES, INT32_MAX, check_csr, check_csr_metadata, col_dtype_for, csr_transpose,
                      row_of_each_nonzero)

_INT32_MAX = INT32_MAX
_FROM_CSR_DTYPES = (torch.int16, torch.int32, torch.int64)


def _pattern_of(mask: torch.Tensor, shape: torch.Size, device: torch.device, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers (int64) and column indices (int16 or int32: col_dtype_for) of a bool mask's True entries."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} does not match the matrix shape {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: mask is on {mask.device} but the matrix is on {device}")
    if shape[1] > _INT32_MAX:
        raise ValueError(f"{op}: {shape[1]} columns do not fit int32 column indices")
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(mask.sum(dim=1), dim=0)
    return crow, mask.nonzero()[:, 1].to(col_dtype_for(shape[1]))


class SparseMatrix:
    """A (rows x cols) CSR matrix.

    Build it with :meth:`from_dense` (a dense matrix and a boolean mask), :meth:`from_mask` or :meth:`from_csr`;
    ``values`` is a plain tensor (it may require grad, or be an ``nn.Parameter``). The fields are read-only;
    :meth:`with_values` gives the same pattern with other values.
    """

    __slots__ = ("_shape", "_crow_indices", "_col_indices", "_values")

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int], *, validate: bool = True) -> None:
        """Wraps ready tensors; the sizes and dtypes are checked here (no data read), the rest by ``validate``."""
        rows, cols = (int(shape[0]), int(shape[1]))
        if rows < 0 or cols < 0:
            raise ValueError(f"SparseMatrix: negative shape {(rows, cols)}")
        if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES or values.dim() != 1:
            raise TypeError(f"SparseMatrix: values must be a 1-D floating tensor, got "
                            f"{values.dtype if isinstance(values, torch.Tensor) else type(values).__name__}")
        check_csr_metadata("SparseMatrix", crow_indices, col_indices, values.device)
        if crow_indices.numel() != rows + 1:
            raise ValueError(f"SparseMatrix: crow_indices has {crow_indices.numel()} entries, expected {rows + 1} for "
                             f"shape {(rows, cols)}")
        if values.numel() != col_indices.numel():
            raise ValueError(f"SparseMatrix: {col_indices.numel()} nonzeros but {values.numel()} values")
        if cols > _INT32_MAX:
            raise ValueError(f"SparseMatrix: {cols} columns do not fit int32 column indices")
        object.__setattr__(self, "_shape", (rows, cols))
        for name, t in (("_crow_indices", crow_indices), ("_col_indices", col_indices), ("_values", values)):
            object.__setattr__(self, name, t)
        if validate:
            self.validate()

    def __setattr__(self, name, value):
        raise AttributeError(f"SparseMatrix is read-only ({name!r}); use with_values() or build a new one")

    def __reduce__(self):  # copy and pickle through the constructor (the fields cannot be set one by one)
        return (_rebuild, (self.crow_indices, self.col_indices, self.values, self.shape))

    col_dtype_for = staticmethod(col_dtype_for)

    shape = property(lambda self: self._shape, doc="(rows, cols)")
    crow_indices = property(lambda self: self._crow_indices, doc="CSR row pointers (int64, rows + 1)")
    col_indices = property(lambda self: self._col_indices,
                           doc="CSR column of each nonzero (int16 up to 32768 columns, else int32)")
    values = property(lambda self: self._values, doc="the nonzeros, in CSR order")

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None) -> SparseMatrix:
        """The entries of `dense` where `mask` is True (default: where `dense` is nonzero).

        ``values`` keeps its autograd link to `dense` (a gather), so gradients reach `dense` at the mask.
        """
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            raise ValueError(f"from_dense: dense must be a 2-D tensor, got "
                             f"{tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__}")
        if dense.dtype not in FLOAT_DTYPES:
            raise TypeError(f"from_dense: dense must be floating (fp16/bf16/fp32/fp64), got {dense.dtype}")
        if mask is None:
            mask = dense.detach() != 0
        crow, col = _pattern_of(mask, dense.shape, dense.device, "from_dense")
        return cls(crow, col, dense[mask], tuple(dense.shape), validate=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> SparseMatrix:
        """The pattern of a bool mask, with `values` in row-major mask order (default: zeros of `dtype`)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("from_mask: mask must be a 2-D bool tensor")
        crow, col = _pattern_of(mask, mask.shape, mask.device, "from_mask")
        if values is None:
            values = torch.zeros(col.numel(), dtype=dtype, device=mask.device)
        elif values.shape != (col.numel(),):
            raise ValueError(f"from_mask: expected {col.numel()} values (one per True entry), got {tuple(values.shape)}")
        return cls(crow, col, values, tuple(mask.shape), validate=False)

    @classmethod
    def from_csr(cls, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int]) -> SparseMatrix:
        """From CSR arrays (integer indices; column indices sorted and unique within each row); checks
        them all before converting the columns to :func:`col_dtype_for` (an out-of-range column is an error, never
        truncated)."""
        rows, cols = int(shape[0]), int(shape[1])
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor) or t.dtype not in _FROM_CSR_DTYPES or t.dim() != 1:
                raise TypeError(f"from_csr: {name} must be a 1-D int16, int32 or int64 tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES or values.dim() != 1:
            raise TypeError("from_csr: values must be a 1-D floating tensor")
        if cols > _INT32_MAX:
            raise ValueError(f"from_csr: {cols} columns do not fit int32 column indices")
        if col_indices.numel():
            low, high = int(col_indices.min()), int(col_indices.max())
            if low < 0 or high >= cols:
                bad = int(((col_indices < 0) | (col_indices >= cols)).nonzero()[0, 0])
                raise ValueError(f"from_csr: col_indices[{bad}] = {int(col_indices[bad])} is outside [0, {cols})")
        crow = crow_indices.to(torch.int64)
        col = col_indices.to(col_dtype_for(cols))
        check_csr_metadata("from_csr", crow, col, values.device)
        if crow.numel() != rows + 1:
            raise ValueError(f"from_csr: crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}")
        check_csr("from_csr", crow, col, cols)
        if values.numel() != col.numel():
            raise ValueError(f"from_csr: {values.numel()} values for {col.numel()} nonzeros")
        return cls(crow, col, values, (rows, cols), validate=False)

    def with_values(self, values: torch.Tensor) -> SparseMatrix:
        """The same pattern (shared index tensors) with other values."""
        if values.shape != (self.nnz,):
            raise ValueError(f"with_values: expected {self.nnz} values, got shape {tuple(values.shape)}")
        return SparseMatrix(self.crow_indices, self.col_indices, values, self.shape, validate=False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseMatrix:
        """Moves the pattern and values (values also cast to `dtype`, if given)."""
        move = lambda t: t.to(device) if device is not None else t  # noqa: E731
        values = self.values.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else self.values
        return SparseMatrix(move(self.crow_indices), move(self.col_indices), values, self.shape, validate=False)

    # ---------------------------------------------------------------------------------------------- reading
    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def row_indices(self) -> torch.Tensor:
        """The row (int64) of each nonzero in CSR order."""
        return row_of_each_nonzero(self.crow_indices)

    def mask(self) -> torch.Tensor:
        """The pattern as a dense bool tensor."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        mask[self.row_indices(), self.col_indices.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """The dense matrix (differentiable w.r.t. values)."""
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return dense.index_put((self.row_indices(), self.col_indices.long()), self.values)

    def transpose_pattern(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transposed (CSC) order, computed now and not kept: column pointers (int64, cols + 1), the row of
        each entry (int32) and, for each entry, its index in the CSR order (int64)."""
        check_csr("transpose_pattern", self.crow_indices, self.col_indices, self.shape[1])
        positions = torch.arange(self.nnz, device=self.device)  # carried along: each entry's CSR index
        return csr_transpose(positions, self.crow_indices, self.col_indices, self.shape[1])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, by part: values and CSR indices (no transposed copy is kept)."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {"values": size(self.values), "csr_indices": size(self.crow_indices) + size(self.col_indices)}

    def __repr__(self) -> str:
        return (f"SparseMatrix(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---------------------------------------------------------------------------------------------- checking
    def validate(self) -> None:
        """Full check of the pattern; raises ValueError/TypeError with the offending values."""
        check_csr("SparseMatrix", self.crow_indices, self.col_indices, self.shape[1])


def _rebuild(crow, col, values, shape) -> SparseMatrix:
    return SparseMatrix(crow, col, values, shape, validate=False)
