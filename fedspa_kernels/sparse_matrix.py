"""SparseMatrix: a matrix with a fixed sparsity pattern (fixed nnz), as FedSpa's sparse layers hold them.

CSR (``crow_indices`` int64, ``col_indices`` int32, ``values``) plus the transpose metadata cached for the
backward pass: the same nonzeros in column-major (CSC) order, as ``ccol_indices`` (int64, cols + 1),
``row_indices_t`` (int32) and ``perm_t`` (int32, the CSR position of each CSC entry). The pattern changes only
when a mask is updated, so building the metadata then (O(nnz log nnz), no dense temporary) is cheap relative
to training; the values change every step and are shared by both orders through ``perm_t``.
"""

from __future__ import annotations

import torch

from .ops._csr import (
    FLOAT_DTYPES,
    check_structure_metadata,
    check_structure_values,
    check_transpose_pair,
    row_of_each_nonzero,
)

_INT32_MAX = 2**31 - 1


def _pattern_of(mask: torch.Tensor, shape: torch.Size, device: torch.device, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers (int64) and column indices (int32) of a bool mask's True entries."""
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
    torch.cumsum(mask.sum(dim=1), dim=0, out=crow[1:])
    return crow, mask.nonzero()[:, 1].to(torch.int32)


class SparseMatrix:
    """A (rows x cols) CSR matrix with cached transpose metadata.

    Build it with :meth:`from_dense` (a dense matrix and a boolean mask) or :meth:`from_csr`; ``values`` is a
    plain tensor (it may require grad, or be an ``nn.Parameter``). The index tensors are read-only by
    contract: they are validated once, and again only if one of them is modified in place.
    """

    __slots__ = ("shape", "crow_indices", "col_indices", "values", "ccol_indices", "row_indices_t", "perm_t",
                 "_validated_versions")

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int], *, ccol_indices: torch.Tensor, row_indices_t: torch.Tensor,
                 perm_t: torch.Tensor, validate: bool = True) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.values = values
        self.ccol_indices = ccol_indices
        self.row_indices_t = row_indices_t
        self.perm_t = perm_t
        self._validated_versions: tuple[int, ...] | None = None
        if validate:
            self.validate()

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
        return cls._with_transpose(crow, col, dense[mask], tuple(dense.shape))

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
        return cls._with_transpose(crow, col, values, tuple(mask.shape))

    @classmethod
    def from_csr(cls, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int]) -> SparseMatrix:
        """From CSR arrays (column indices sorted and unique within each row); validates them."""
        rows, cols = int(shape[0]), int(shape[1])
        crow = crow_indices.to(torch.int64)
        col = col_indices.to(torch.int32)
        check_structure_metadata("from_csr", crow, col, None, values.device)
        if crow.numel() != rows + 1:
            raise ValueError(f"from_csr: crow_indices has {crow.numel()} entries, expected rows + 1 = {rows + 1}")
        check_structure_values("from_csr", crow, col, None, cols, values.numel())
        return cls._with_transpose(crow, col, values, (rows, cols), check=True)

    @classmethod
    def _with_transpose(cls, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                        check: bool = False) -> SparseMatrix:
        nnz = col.numel()
        if nnz > _INT32_MAX:
            raise ValueError(f"SparseMatrix: {nnz} nonzeros do not fit int32 permutation indices")
        perm = torch.argsort(col, stable=True)  # CSR is row-major, so equal columns keep ascending rows
        row_t = row_of_each_nonzero(crow)[perm].to(torch.int32)
        ccol = torch.zeros(shape[1] + 1, dtype=torch.int64, device=col.device)
        if nnz:
            torch.cumsum(torch.bincount(col.long(), minlength=shape[1]), dim=0, out=ccol[1:])
        matrix = cls(crow, col, values, shape, ccol_indices=ccol, row_indices_t=row_t, perm_t=perm.to(torch.int32),
                     validate=check)
        if not check:
            matrix._validated_versions = matrix._versions()  # correct by construction
        return matrix

    def with_values(self, values: torch.Tensor) -> SparseMatrix:
        """The same pattern (shared index tensors) with other values."""
        if values.shape != (self.nnz,):
            raise ValueError(f"with_values: expected {self.nnz} values, got shape {tuple(values.shape)}")
        other = SparseMatrix(self.crow_indices, self.col_indices, values, self.shape, ccol_indices=self.ccol_indices,
                             row_indices_t=self.row_indices_t, perm_t=self.perm_t, validate=False)
        other._validated_versions = self._validated_versions
        return other

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseMatrix:
        """Moves the pattern and values (values also cast to `dtype`, if given)."""
        move = lambda t: t.to(device) if device is not None else t  # noqa: E731
        values = self.values.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else self.values
        other = SparseMatrix(move(self.crow_indices), move(self.col_indices), values, self.shape,
                             ccol_indices=move(self.ccol_indices), row_indices_t=move(self.row_indices_t),
                             perm_t=move(self.perm_t), validate=False)
        other._validated_versions = other._versions() if self._validated_versions is not None else None
        return other

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

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, by part: values, CSR indices, transpose metadata."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {
            "values": size(self.values),
            "csr_indices": size(self.crow_indices) + size(self.col_indices),
            "transpose_metadata": size(self.ccol_indices) + size(self.row_indices_t) + size(self.perm_t),
        }

    def __repr__(self) -> str:
        return (f"SparseMatrix(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---------------------------------------------------------------------------------------------- checking
    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (self.crow_indices, self.col_indices, self.ccol_indices,
                                          self.row_indices_t, self.perm_t))

    def validate(self) -> None:
        """Full check of both orders and their agreement; raises ValueError/TypeError with the offending values."""
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise ValueError(f"SparseMatrix: negative shape {self.shape}")
        if self.values.dtype not in FLOAT_DTYPES or self.values.dim() != 1:
            raise TypeError(f"SparseMatrix: values must be a 1-D floating tensor, got {self.values.dtype} of shape "
                            f"{tuple(self.values.shape)}")
        device = self.values.device
        check_structure_metadata("SparseMatrix", self.crow_indices, self.col_indices, None, device)
        check_structure_metadata("SparseMatrix (transpose)", self.ccol_indices, self.row_indices_t, self.perm_t,
                                 device)
        check_transpose_pair("SparseMatrix", self.crow_indices, self.col_indices, None, self.ccol_indices,
                             self.row_indices_t, self.perm_t, rows, cols, self.values.numel())
        if self.nnz:
            rows_csr = self.row_indices()
            same_row = rows_csr[1:] == rows_csr[:-1]
            unsorted = (same_row & (self.col_indices[1:] <= self.col_indices[:-1])).nonzero()
            if unsorted.numel():
                k = int(unsorted[0, 0])
                raise ValueError(f"SparseMatrix: column indices of row {int(rows_csr[k])} are not strictly increasing "
                                 f"at nonzero {k + 1}: {int(self.col_indices[k])} then {int(self.col_indices[k + 1])}")
        self._validated_versions = self._versions()

    def ensure_valid(self) -> None:
        """Validates again only if an index tensor was modified in place since the last validation."""
        if self._validated_versions != self._versions():
            self.validate()
