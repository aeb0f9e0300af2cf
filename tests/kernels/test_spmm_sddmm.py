"""SpMM, SDDMM, masked_matmul and sparse_linear: every backend against the reference and the dense math."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk
from tests.helpers import backend_device_params, poison_allocator

PARAMS = backend_device_params("spmm")
DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]
# (rows, cols): odd sizes; 2100 and 1100 columns cross the CPU kernels' L2 panels (2048 fp32 / 1024 fp64 rows)
SHAPES = [(37, 53), (1, 1), (64, 130), (30, 2100)]
COL_DTYPES = [torch.int16, torch.int32]


def _supports(backend: str, device: str, dtype: torch.dtype) -> bool:
    if backend == "cpp" and dtype in (torch.float16, torch.bfloat16):
        return False
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return False  # bf16 is wrong under the Triton interpreter
    return True


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


def _matrix(rows, cols, density, dtype, device):
    dense = torch.randn(rows, cols, dtype=torch.float64)
    mask = torch.rand(rows, cols) < density
    if rows > 2:
        mask[1] = False  # an empty row
    return fk.SparseMatrix.from_dense(dense.to(dtype).to(device), mask.to(device))


def _close(got, expected, dtype):
    tol = _tol(dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_spmm_matches_dense(backend, device, shape, density, n):
    if backend == "triton" and device == "cpu" and shape[1] > 500 and (n > 7 or density > 0.01):
        pytest.skip("too slow for the Triton CPU interpreter (the panel-crossing shape is for the CPU kernels)")
    S = _matrix(*shape, density, torch.float32, device)
    dense_w = S.to_dense().double()
    d = torch.randn(shape[1], n, device=device)
    e = torch.randn(shape[0], n, device=device)
    poison_allocator(shape[0] * n, torch.float32, device)
    _close(fk.spmm(S, d, backend=backend), dense_w @ d.double(), torch.float32)
    poison_allocator(shape[1] * n, torch.float32, device)
    _close(fk.spmm(S, e, transpose=True, backend=backend), dense_w.t() @ e.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_spmm_sddmm_dtypes(backend, device, dtype):
    S = _matrix(40, 1100, 0.1, dtype, device)
    d = torch.randn(1100, 70, device=device).to(dtype)
    a, b = torch.randn(40, 70, device=device).to(dtype), torch.randn(70, 1100, device=device).to(dtype)
    if not _supports(backend, device, dtype):
        if backend == "cpp":
            with pytest.raises(TypeError, match=r"\(cpp\): values must be a 1-D float32 or float64"):
                fk.spmm(S, d, backend=backend)
            return
        pytest.skip(f"{dtype} unsupported by {backend} on {device}")
    expected = S.to_dense().double() @ d.double()
    _close(fk.spmm(S, d, backend=backend), expected, dtype)
    _close(fk.sddmm(a, b, S, backend=backend), (a.double() @ b.double())[S.mask()], dtype)
    assert fk.spmm(S, d, backend=backend).dtype == dtype


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
# k = 32, 64, 96, 128: the CPU per-row path, sixteen nonzeros at a time (every tail length), slices of 64 and 32;
# k = 300: a full 256-wide slice of the CPU row-block path and a masked 44-wide tail
@pytest.mark.parametrize("k", [1, 7, 32, 64, 96, 128, 130, 300])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_sddmm_matches_dense(backend, device, shape, density, k):
    if backend == "triton" and device == "cpu" and shape[1] > 500 and (k > 7 or density > 0.01):
        pytest.skip("too slow for the Triton CPU interpreter (the panel-crossing shape is for the CPU kernels)")
    S = _matrix(*shape, density, torch.float32, device)
    a = torch.randn(shape[0], k, device=device)
    b = torch.randn(k, shape[1], device=device)
    poison_allocator(S.nnz, torch.float32, device)
    got = fk.sddmm(a, b, S, backend=backend)
    assert got.shape == (S.nnz,)
    _close(got, (a.double() @ b.double())[S.mask()], torch.float32)
    mask = S.mask()
    _close(fk.masked_matmul(a, b, mask, backend=backend), (a.double() @ b.double())[mask], torch.float32)


def _with_col_dtype(S: fk.SparseMatrix, col_dtype: torch.dtype) -> fk.SparseMatrix:
    return fk.SparseMatrix(S.crow_indices, S.col_indices.to(col_dtype), S.values, S.shape)


@pytest.mark.parametrize("shape,density", [((37, 53), 0.3), ((30, 2100), 0.05), ((20, 130), 1.0)], ids=str)
@pytest.mark.parametrize("backend,device", PARAMS)
def test_int16_and_int32_columns_give_the_same_results(backend, device, shape, density):
    """A pattern's columns are int16 when they fit (what SparseMatrix stores) or int32: every product and its
    gradients are right with either, and bit-identical between them (the same arithmetic in the same order)."""
    n = 5
    S16 = _matrix(*shape, density, torch.float32, device)
    assert S16.col_indices.dtype == torch.int16
    S32 = _with_col_dtype(S16, torch.int32)
    dense_w = S16.to_dense().double()
    d, e = torch.randn(shape[1], n, device=device), torch.randn(shape[0], n, device=device)
    a, b = torch.randn(shape[0], n, device=device), torch.randn(n, shape[1], device=device)
    x = torch.randn(4, shape[1], device=device, requires_grad=True)
    results = {}
    for S in (S16, S32):
        poison_allocator(shape[0] * n, torch.float32, device)
        forward = fk.spmm(S, d, backend=backend)
        _close(forward, dense_w @ d.double(), torch.float32)
        poison_allocator(shape[1] * n, torch.float32, device)
        transposed = fk.spmm(S, e, transpose=True, backend=backend)
        _close(transposed, dense_w.t() @ e.double(), torch.float32)
        poison_allocator(S.nnz, torch.float32, device)
        sampled = fk.sddmm(a, b, S, backend=backend)
        _close(sampled, (a.double() @ b.double())[S.mask()], torch.float32)
        values = S.values.detach().clone().requires_grad_()
        out = fk.sparse_linear(x, S.with_values(values), backend=backend)
        grad_values, grad_x = torch.autograd.grad(out.square().sum(), (values, x))
        reference = x.detach().double() @ dense_w.t()
        _close(out, reference, torch.float32)
        results[S.col_indices.dtype] = (forward, transposed, sampled, out, grad_values, grad_x)
    for got16, got32 in zip(results[torch.int16], results[torch.int32]):
        assert torch.equal(got16, got32)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_a_matrix_wider_than_int16_keeps_int32_columns(backend, device):
    """Beyond 32768 columns the columns stay int32 (an int16 column would wrap): products reach the last column."""
    cols = 40_000
    assert fk.SparseMatrix.col_dtype_for(2**15) == torch.int16
    assert fk.SparseMatrix.col_dtype_for(2**15 + 1) == torch.int32
    with pytest.raises(ValueError, match="2147483648 columns do not fit int32 column indices"):
        fk.SparseMatrix.col_dtype_for(2**31)
    mask = torch.rand(3, cols) < 0.002
    mask[0, cols - 1] = mask[2, 2**15] = True  # columns an int16 cannot hold
    S = fk.SparseMatrix.from_dense(torch.randn(3, cols).to(device), mask.to(device))
    assert S.col_indices.dtype == torch.int32 and int(S.col_indices.max()) == cols - 1
    d, e = torch.randn(cols, 3, device=device), torch.randn(3, 3, device=device)
    _close(fk.spmm(S, d, backend=backend), S.to_dense().double() @ d.double(), torch.float32)
    _close(fk.spmm(S, e, transpose=True, backend=backend), S.to_dense().double().t() @ e.double(), torch.float32)
    with pytest.raises(ValueError, match=r"col_indices\[\d+\] = -\d+ is outside \[0, 40000\)"):
        fk.spmm(fk.SparseMatrix(S.crow_indices, S.col_indices.to(torch.int16), S.values, S.shape, validate=False),
                d, backend=backend)  # the int16 cast wrapped the columns above 32767 to negative values


@pytest.mark.parametrize("backend,device", PARAMS)
def test_zero_inner_dimension_and_batch_one(backend, device):
    S = _matrix(6, 9, 0.5, torch.float32, device)
    out = fk.sddmm(torch.randn(6, 0, device=device), torch.randn(0, 9, device=device), S, backend=backend)
    assert torch.equal(out, torch.zeros(S.nnz, device=device))
    x = torch.randn(9, device=device)  # a vector
    _close(fk.spmm(S, x, backend=backend), S.to_dense().double() @ x.double(), torch.float32)
    x1 = torch.randn(1, 9, device=device)  # batch 1
    _close(fk.sparse_linear(x1, S, backend=backend), x1.double() @ S.to_dense().double().t(), torch.float32)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_noncontiguous_and_transposed_operands(backend, device):
    S = _matrix(40, 60, 0.2, torch.float32, device)
    big = torch.randn(60, 30, device=device)
    strided = big[:, ::3]  # column stride 3
    transposed = torch.randn(10, 60, device=device).t()  # (60, 10) column-major
    for d in (strided, transposed):
        assert not d.is_contiguous()
        _close(fk.spmm(S, d, backend=backend), S.to_dense().double() @ d.double(), torch.float32)
    a = torch.randn(12, 40, device=device).t()  # (40, 12) view
    b = torch.randn(60, 12, device=device).t()  # (12, 60) view
    _close(fk.sddmm(a, b, S, backend=backend), (a.double() @ b.double())[S.mask()], torch.float32)
    x = torch.randn(5, 120, device=device)[:, ::2]  # (5, 60) strided rows
    _close(fk.sparse_linear(x, S, backend=backend), x.double() @ S.to_dense().double().t(), torch.float32)


@pytest.mark.parametrize("backend,device", PARAMS)
@pytest.mark.parametrize("shape,n", [((50, 70, 0.2), 9), ((37, 300, 0.3), 70), ((64, 40, 0.5), 1), ((20, 30, 0.0), 8),
                                     ((40, 30, 1.0), 24)], ids=str)
def test_spmm_transposed_kernel_op(backend, device, shape, n):
    """The raw S^T @ dense op, straight from the CSR order (odd widths: the C++ kernel's vector passes and scalar
    tails; density 0 and 1), against S^T computed densely; a poisoned allocator behind every output."""
    suffix = "_triton" if backend == "triton" else ""
    rows, cols, density = shape
    S = _matrix(rows, cols, density, torch.float32, device)
    op = (fk.ops.spmm.spmm_transposed_reference if backend == "reference"
          else getattr(torch.ops.fedspa, "spmm_transposed" + suffix))
    e = torch.randn(rows, n, device=device)
    poison_allocator(cols * n, torch.float32, device)
    got = op(S.values, S.crow_indices, S.col_indices, e, cols)
    _close(got, S.to_dense().double().t() @ e.double(), torch.float32)
    if backend != "triton":  # fp64 (the Triton interpreter's exact path is fp32)
        S64 = S.to(dtype=torch.float64)
        torch.testing.assert_close(op(S64.values, S64.crow_indices, S64.col_indices, e.double(), cols),
                                   S64.to_dense().t() @ e.double())


# ------------------------------------------------------------------------------------------------------------------
# sparse_linear: the layer's three products and its gradients, against the dense layer with a masked weight
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_linear_equals_masked_dense_layer(backend, device, density):
    S = _matrix(37, 53, density, torch.float64, device)
    values = S.values.detach().clone().requires_grad_()
    W = S.with_values(values)
    x = torch.randn(3, 4, 53, dtype=torch.float64, device=device, requires_grad=True)  # leading dims are kept
    bias = torch.randn(37, dtype=torch.float64, device=device, requires_grad=True)
    y = fk.sparse_linear(x, W, bias, backend=backend)
    dense = S.to_dense().detach().clone().requires_grad_()
    x2, bias2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y2 = x2 @ dense.t() + bias2
    assert y.shape == (3, 4, 37)
    torch.testing.assert_close(y, y2)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y2.backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(values.grad, dense.grad[S.mask()])
    torch.testing.assert_close(bias.grad, bias2.grad)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_the_input_gradient_comes_in_the_input_layout(backend, device):
    """A row-major x gets a row-major gradient (the kernels work feature-major, so the product's operand is x's
    transposed view): without it, autograd or the op before copies the gradient into x's layout, which for the
    default CNN's fc at batch 64 took 19% of the training step. Values against the dense layer, in fp64."""
    S = _matrix(37, 53, 0.3, torch.float64, device)
    dense_w = S.to_dense()
    for lead in ((6,), (3, 4)):
        leaf = torch.randn(*lead, 53, dtype=torch.float64, device=device, requires_grad=True)
        x = leaf * 1.0  # a row-major activation, not a leaf: its gradient is what the op hands back
        upstream = torch.randn(*lead, 37, dtype=torch.float64, device=device)
        grad, = torch.autograd.grad(fk.sparse_linear(x, S, backend=backend), x, upstream)
        assert grad.is_contiguous(), grad.stride()
        torch.testing.assert_close(grad, upstream @ dense_w)
    d = torch.randn(9, 53, dtype=torch.float64, device=device).t().requires_grad_()  # a column-major (53, 9) leaf
    view = d * 1.0
    assert view.stride() == (1, 53)
    upstream = torch.randn(37, 9, dtype=torch.float64, device=device)
    grad, = torch.autograd.grad(fk.spmm(S, view, backend=backend), view, upstream)
    assert grad.stride() == (1, 53)
    torch.testing.assert_close(grad, dense_w.t() @ upstream)
    e = torch.randn(37, 9, dtype=torch.float64, device=device)  # a row-major operand keeps a row-major gradient
    e.requires_grad_()
    grad, = torch.autograd.grad(fk.spmm(S, e, transpose=True, backend=backend), e, torch.randn(53, 9).to(e))
    assert grad.is_contiguous()
    x = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    S6 = _matrix(5, 6, 0.4, torch.float64, device)
    values = S6.values.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda xx, v: fk.sparse_linear(xx * 1.0, S6.with_values(v), backend=backend),
                                        (x, values))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_sparse_linear_with_a_dense_weight(backend, device):
    weight = (torch.randn(20, 30, device=device) * (torch.rand(20, 30, device=device) < 0.3)).requires_grad_()
    x = torch.randn(4, 30, device=device)
    y = fk.sparse_linear(x, weight, backend=backend)
    _close(y, x.double() @ weight.detach().double().t(), torch.float32)
    y.sum().backward()
    expected = (torch.ones(4, 20, device=device).t() @ x) * (weight.detach() != 0)
    _close(weight.grad, expected, torch.float32)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_gradcheck_float64(backend, device):
    S = _matrix(5, 6, 0.4, torch.float64, device)
    values = S.values.detach().clone().requires_grad_()
    d = torch.randn(6, 2, dtype=torch.float64, device=device, requires_grad=True)
    e = torch.randn(5, 2, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, m: fk.spmm(S.with_values(v), m, backend=backend), (values, d))
    assert torch.autograd.gradcheck(lambda v, m: fk.spmm(S.with_values(v), m, transpose=True, backend=backend),
                                    (values, e))
    assert torch.autograd.gradcheck(lambda p, q: fk.sddmm(p, q, S, backend=backend), (a, b))
    assert torch.autograd.gradcheck(lambda xx, v, bb: fk.sparse_linear(xx, S.with_values(v), bb, backend=backend),
                                    (x, values, bias))
    # the backward passes are themselves differentiable
    assert torch.autograd.gradgradcheck(lambda v, m: fk.spmm(S.with_values(v), m, backend=backend), (values, d))
    assert torch.autograd.gradgradcheck(lambda p, q: fk.sddmm(p, q, S, backend=backend), (a, b))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_opcheck(backend, device):
    S = _matrix(11, 13, 0.4, torch.float32, device)
    d = torch.randn(13, 5, device=device)
    a, bt = torch.randn(11, 6, device=device), torch.randn(13, 6, device=device)
    pattern = (S.crow_indices, S.col_indices)
    if backend != "reference":
        suffix = "_triton" if backend == "triton" else ""
        torch.library.opcheck(getattr(torch.ops.fedspa, "spmm" + suffix), (S.values, *pattern, d))
        torch.library.opcheck(getattr(torch.ops.fedspa, "spmm_transposed" + suffix),
                              (S.values, *pattern, torch.randn(11, 5, device=device), 13))
        torch.library.opcheck(getattr(torch.ops.fedspa, "sddmm" + suffix), (a, bt, *pattern))
    values = S.values.detach().clone().requires_grad_()
    for transpose, dense in ((False, d), (True, torch.randn(11, 5, device=device))):
        torch.library.opcheck(torch.ops.fedspa.spmm_autograd,
                              (values, *pattern, dense.requires_grad_(), transpose, 13, backend))
    torch.library.opcheck(torch.ops.fedspa.sddmm_autograd, (a.requires_grad_(), bt.requires_grad_(), *pattern, backend))


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("col_dtype", COL_DTYPES)
@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_structures_in_direct_op_calls(backend, device, col_dtype):
    """The raw ops check the pattern themselves before any kernel reads memory through it."""
    if backend == "reference":
        spmm, sddmm = fk.spmm_reference, fk.sddmm_reference
        spmm_t = fk.ops.spmm.spmm_transposed_reference
    else:
        suffix = "_triton" if backend == "triton" else ""
        spmm = getattr(torch.ops.fedspa, "spmm" + suffix)
        sddmm = getattr(torch.ops.fedspa, "sddmm" + suffix)
        spmm_t = getattr(torch.ops.fedspa, "spmm_transposed" + suffix)
    crow = torch.tensor([0, 2, 3], device=device)
    col = torch.tensor([0, 9, 1], dtype=col_dtype, device=device)
    values, d = torch.ones(3, device=device), torch.randn(4, 2, device=device)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 9 is outside \[0, 4\)"):
        spmm(values, crow, col, d)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 9 is outside \[0, 4\)"):
        sddmm(torch.randn(2, 3, device=device), torch.randn(4, 3, device=device), crow, col)
    with pytest.raises(ValueError, match=r"spmm_transposed: col_indices\[1\] = 9 is outside \[0, 4\)"):
        spmm_t(values, crow, col, torch.randn(2, 2, device=device), 4)  # a write through col would land outside
    with pytest.raises(ValueError, match=r"spmm_transposed: the pattern has 2 rows but dense has shape"):
        spmm_t(values, crow, torch.tensor([0, 3, 1], dtype=col_dtype, device=device), d, 4)
    with pytest.raises(ValueError, match=r"spmm_transposed: cols must be"):
        spmm_t(values, crow, torch.tensor([0, 3, 1], dtype=col_dtype, device=device), d[:2], -1)
    with pytest.raises(ValueError, match=r"col_indices\[0\] = -1 is outside \[0, 4\)"):
        spmm(values, crow, torch.tensor([-1, 3, 1], dtype=col_dtype, device=device), d)
    col = torch.tensor([0, 3, 1], dtype=col_dtype, device=device)
    with pytest.raises(ValueError, match="crow_indices decreases at row 1: 2 -> 1"):
        spmm(values, torch.tensor([0, 2, 1, 3], device=device), col, d)
    with pytest.raises(ValueError, match="must start at 0 and end at nnz=3"):
        spmm(values, torch.tensor([0, 2, 4], device=device), col, d)
    with pytest.raises(ValueError, match="must start at 0 and end at nnz=3"):
        spmm(values, torch.tensor([1, 2, 3], device=device), col, d)
    with pytest.raises(ValueError, match="column indices of row 0 are not strictly increasing at nonzero 1: 3 then 3"):
        spmm(values, crow, torch.tensor([3, 3, 1], dtype=col_dtype, device=device), d)
    with pytest.raises(ValueError, match="column indices of row 0 are not strictly increasing at nonzero 1: 3 then 0"):
        sddmm(torch.randn(2, 3, device=device), torch.randn(4, 3, device=device), crow,
              torch.tensor([3, 0, 1], dtype=col_dtype, device=device))
    with pytest.raises(ValueError, match="2 values for 3 nonzeros"):
        spmm(values[:2], crow, col, d)
    with pytest.raises(TypeError, match="col_indices must be a 1-D int16 or int32 tensor"):
        spmm(values, crow, col.long(), d)
    with pytest.raises(TypeError, match="crow_indices must be a non-empty 1-D int64 tensor"):
        spmm(values, crow.int(), col, d)
    with pytest.raises(TypeError, match="dense is torch.float64 but values are torch.float32|dense is Double but values are Float"):
        spmm(values, crow, col, d.double())


def test_autograd_ops_take_the_backend():
    S = fk.SparseMatrix.from_dense(torch.randn(5, 6), torch.rand(5, 6) < 0.5)
    with pytest.raises(ValueError, match="unknown backend 'mkl'"):
        torch.ops.fedspa.spmm_autograd(S.values, S.crow_indices, S.col_indices, torch.randn(6, 2), False, 6, "mkl")


def test_public_api_errors():
    S = fk.SparseMatrix.from_dense(torch.randn(5, 6), torch.rand(5, 6) < 0.5)
    with pytest.raises(ValueError, match=r"S has 6 columns but d has shape \(5, 2\)"):
        fk.spmm(S, torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"S\^T has 5 columns but d has shape \(6, 2\)"):
        fk.spmm(S, torch.randn(6, 2), transpose=True)
    with pytest.raises(TypeError, match="d is torch.float64 but the sparse values are torch.float32"):
        fk.spmm(S, torch.randn(6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="d is on meta but the sparse matrix is on cpu"):
        fk.spmm(S, torch.randn(6, 2, device="meta"))
    with pytest.raises(TypeError, match="expected a SparseMatrix"):
        fk.spmm(torch.randn(5, 6), torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"does not give the pattern's shape \(5, 6\)"):
        fk.sddmm(torch.randn(5, 3), torch.randn(3, 7), S)
    with pytest.raises(ValueError, match=r"mask shape|does not give the pattern's shape \(4, 6\)"):
        fk.masked_matmul(torch.randn(5, 3), torch.randn(3, 6), torch.rand(4, 6) < 0.5)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fk.masked_matmul(torch.randn(5, 3), torch.randn(3, 6), torch.rand(5, 6))
    with pytest.raises(ValueError, match="x has shape \\(2, 5\\) but the weight has 6 input features"):
        fk.sparse_linear(torch.randn(2, 5), S)
    with pytest.raises(ValueError, match="bias must be \\(5,\\)"):
        fk.sparse_linear(torch.randn(2, 6), S, torch.randn(4))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_nan_and_inf_reach_exactly_the_outputs_that_read_them(backend, device):
    """Sparse semantics on every backend: only stored entries multiply, so a NaN/Inf in dense row j reaches the
    output rows with a nonzero in column j and no other (a dense matmul would spread 0 * inf everywhere)."""
    S = _matrix(12, 9, 0.3, torch.float32, device)
    d = torch.randn(9, 4, device=device)
    d[2, 1], d[5, :] = float("nan"), float("inf")
    out = fk.spmm(S, d, backend=backend)
    mask = S.mask().cpu()
    reads = mask[:, [2, 5]].any(1)
    assert torch.isfinite(out.cpu()[~reads]).all()
    assert (~torch.isfinite(out.cpu()[mask[:, 5]])).all()  # +-inf, or nan where opposite infinities meet
    torch.testing.assert_close(out.cpu(), fk.spmm(S.to("cpu"), d.cpu(), backend="reference"), equal_nan=True)
    a, b = torch.randn(12, 3, device=device), torch.randn(3, 9, device=device)
    a[4, 0] = float("nan")
    got = fk.sddmm(a, b, S, backend=backend).cpu()
    rows = S.row_indices().cpu()
    assert torch.isnan(got[rows == 4]).all() and torch.isfinite(got[rows != 4]).all()


@pytest.mark.parametrize("col_dtype", COL_DTYPES)
@pytest.mark.parametrize("backend,device", PARAMS)
def test_an_unsorted_pair_is_found_at_every_position_of_a_long_row(backend, device, col_dtype):
    """The native checks scan rows eight int32 (sixteen int16) columns at a time: a duplicate or a decrease at any
    lane or in the tail is found."""
    if backend == "triton" and device == "cpu":
        pytest.skip("one position suffices for the interpreter (the scan is the Python check there)")
    crow = torch.tensor([0, 3, 3 + 37], device=device)
    good = torch.cat([torch.tensor([1, 4, 9]), torch.arange(0, 74, 2)]).to(device=device, dtype=col_dtype)
    d = torch.randn(80, 2, device=device)
    kernel = fk.ops.spmm.SPMM.kernel(backend)
    kernel(torch.ones(40, device=device), crow, good, d)
    for k in range(4, 40):
        for kind, value in (("duplicate", good[k - 1]), ("decrease", good[k - 1] - 1)):
            if value < 0:
                continue  # below the first column: reported as out of range instead
            bad = good.clone()
            bad[k] = value
            with pytest.raises(ValueError, match=f"row 1 are not strictly increasing at nonzero {k}"):
                kernel(torch.ones(40, device=device), crow, bad, d)
