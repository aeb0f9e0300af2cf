"""SparseMatrix: construction (CSR only), the transposed order computed on demand, validation."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk

DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]


def _random(rows, cols, density, dtype=torch.float32):
    dense = torch.randn(rows, cols, dtype=dtype)
    mask = torch.rand(rows, cols) < density
    return dense, mask


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (64, 7), (5, 300)])
def test_from_dense_round_trip_and_transpose_pattern(shape, density):
    dense, mask = _random(*shape, density)
    mask[0] = False  # an empty row
    S = fk.SparseMatrix.from_dense(dense, mask)
    assert S.shape == shape and S.nnz == int(mask.sum())
    assert torch.equal(S.to_dense(), dense * mask)
    assert torch.equal(S.mask(), mask)
    assert S.crow_indices.dtype == torch.int64 and S.col_indices.dtype == torch.int16  # 2 bytes: the columns fit
    # CSR: row-major order of the mask's True entries
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(S.row_indices(), rows) and torch.equal(S.col_indices.long(), cols)
    # the transposed order: column-major, each entry pointing at the same (row, col) in CSR order
    ccol, row_t, perm = S.transpose_pattern()
    rows_t, cols_t = mask.t().nonzero(as_tuple=True)  # (col, row) pairs in column-major order
    assert row_t.dtype == torch.int32 and torch.equal(row_t.long(), cols_t)
    assert torch.equal(ccol[1:] - ccol[:-1], mask.sum(0))
    assert torch.equal(rows[perm], cols_t) and torch.equal(cols[perm], rows_t)
    S.validate()


def test_from_dense_defaults_to_nonzeros_and_keeps_autograd():
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    S = fk.SparseMatrix.from_dense(dense)
    assert S.nnz == 2 and S.values.tolist() == [2.0, 3.0]
    S.values.sum().backward()
    assert dense.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_from_mask_and_from_csr():
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    S = fk.SparseMatrix.from_mask(mask, dtype=torch.float64)
    assert S.values.dtype == torch.float64 and S.values.tolist() == [0.0, 0.0, 0.0]
    T = fk.SparseMatrix.from_csr(torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 1]), torch.tensor([1.0, 2.0, 3.0]),
                                 (3, 3))
    assert torch.equal(T.mask(), mask)
    assert T.to_dense().tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    with pytest.raises(ValueError, match="expected 3 values"):
        fk.SparseMatrix.from_mask(mask, values=torch.ones(2))


def test_with_values_to_and_memory():
    dense, mask = _random(20, 30, 0.2)
    S = fk.SparseMatrix.from_dense(dense, mask)
    V = S.with_values(torch.ones(S.nnz))
    assert V.col_indices is S.col_indices and torch.equal(V.to_dense(), mask.float())
    with pytest.raises(ValueError, match=f"expected {S.nnz} values"):
        S.with_values(torch.ones(S.nnz + 1))
    D = S.to(dtype=torch.float64)
    assert D.dtype == torch.float64 and torch.equal(D.to_dense(), (dense * mask).double())
    memory = S.memory_bytes()
    assert memory["values"] == 4 * S.nnz
    assert memory == {"values": 4 * S.nnz, "csr_indices": 8 * 21 + 2 * S.nnz}  # int16 columns; nothing else kept


def test_construction_errors():
    dense, mask = _random(4, 5, 0.5)
    with pytest.raises(ValueError, match=r"mask shape \(5, 4\) does not match the matrix shape \(4, 5\)"):
        fk.SparseMatrix.from_dense(dense, mask.t())
    with pytest.raises(TypeError, match="mask must be a bool tensor, got torch.float32"):
        fk.SparseMatrix.from_dense(dense, mask.float())
    with pytest.raises(TypeError, match="dense must be floating"):
        fk.SparseMatrix.from_dense(dense.long(), mask)
    with pytest.raises(ValueError, match="dense must be a 2-D tensor"):
        fk.SparseMatrix.from_dense(dense[0], mask[0])
    with pytest.raises(ValueError, match="mask is on meta but the matrix is on cpu"):
        fk.SparseMatrix.from_dense(dense, mask.to("meta"))


@pytest.mark.parametrize(
    "crow,col,message",
    [
        ([0, 2, 3], [1, 1, 0], "column indices of row 0 are not strictly increasing at nonzero 1: 1 then 1"),
        ([0, 2, 3], [2, 1, 0], "column indices of row 0 are not strictly increasing"),
        ([0, 2, 3], [0, 5, 1], r"col_indices\[1\] = 5 is outside \[0, 4\)"),
        ([0, 2, 1], [0, 1, 2], "must start at 0 and end at nnz=3, got 0 and 1"),
        ([0, 3, 2, 3], [0, 1, 2], "crow_indices decreases at row 1: 3 -> 2"),
        ([1, 2, 3], [0, 1, 2], "must start at 0"),
    ],
)
def test_from_csr_rejects_bad_structures(crow, col, message):
    rows = len(crow) - 1
    with pytest.raises(ValueError, match=message):
        fk.SparseMatrix.from_csr(torch.tensor(crow), torch.tensor(col), torch.ones(len(col)), (rows, 4))


def test_from_csr_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="crow_indices has 3 entries, expected rows \\+ 1 = 4"):
        fk.SparseMatrix.from_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2), (3, 4))
    with pytest.raises(ValueError, match="3 values for 2 nonzeros"):
        fk.SparseMatrix.from_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(3), (2, 4))


def test_fields_are_read_only_and_validate_checks_the_pattern():
    dense, mask = _random(30, 40, 0.3)
    S = fk.SparseMatrix.from_dense(dense, mask)
    for name in ("crow_indices", "col_indices", "values", "shape"):
        with pytest.raises(AttributeError, match="SparseMatrix is read-only"):
            setattr(S, name, getattr(S, name))
    S2 = fk.SparseMatrix.from_dense(dense, mask)
    S2.col_indices[[0, 1]] = S2.col_indices[[1, 0]]  # row 0's columns no longer increase
    with pytest.raises(ValueError, match="column indices of row 0 are not strictly increasing"):
        S2.validate()
    with pytest.raises(ValueError, match="column indices of row 0 are not strictly increasing"):
        S2.transpose_pattern()
    import copy
    import pickle

    for twin in (copy.deepcopy(S), pickle.loads(pickle.dumps(S))):
        assert twin.shape == S.shape and torch.equal(twin.to_dense(), S.to_dense())


def test_from_csr_never_truncates_indices():
    values = torch.ones(2)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 4294967298 is outside \[0, 4\)"):
        fk.SparseMatrix.from_csr(torch.tensor([0, 2]), torch.tensor([0, 2**32 + 2]), values, (1, 4))
    with pytest.raises(TypeError, match="col_indices must be a 1-D int16, int32 or int64 tensor"):
        fk.SparseMatrix.from_csr(torch.tensor([0, 2]), torch.tensor([0.0, 2.7]), values, (1, 4))
    with pytest.raises(TypeError, match="crow_indices must be a 1-D int16, int32 or int64 tensor"):
        fk.SparseMatrix.from_csr(torch.tensor([0.0, 2.0]), torch.tensor([0, 2]), values, (1, 4))
    S = fk.SparseMatrix.from_csr(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 3]), values, (1, 4))
    assert S.col_indices.tolist() == [0, 3] and S.col_indices.dtype == torch.int16
    # an int64 column that fits int32 but not int16 keeps int32 columns on a wide matrix, and is refused on a
    # narrow one (never wrapped to a negative int16)
    wide = fk.SparseMatrix.from_csr(torch.tensor([0, 2]), torch.tensor([0, 40_000]), values, (1, 40_001))
    assert wide.col_indices.dtype == torch.int32 and wide.col_indices.tolist() == [0, 40_000]
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 40000 is outside \[0, 100\)"):
        fk.SparseMatrix.from_csr(torch.tensor([0, 2]), torch.tensor([0, 40_000]), values, (1, 100))
    with pytest.raises(TypeError, match="col_indices must be a 1-D int16 or int32 tensor"):
        fk.SparseMatrix(torch.tensor([0, 2]), torch.tensor([0, 3]), values, (1, 4))  # int64 columns: convert first


def test_a_sparse_matrix_can_be_built_and_used_in_inference_mode():
    with torch.inference_mode():
        S = fk.SparseMatrix.from_dense(torch.randn(6, 5), torch.rand(6, 5) < 0.5)
        d = torch.randn(5, 3)
        out = fk.spmm(S, d)
        expected = S.to_dense() @ d
    torch.testing.assert_close(out, expected)
