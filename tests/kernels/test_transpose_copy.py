"""fedspa::transpose_copy: every backend against the reference (itself checked against torch's transpose)."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk
from tests.helpers import backend_device_params, poison_allocator

PARAMS = backend_device_params("transpose_copy")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

SHAPES = [
    pytest.param((1, 1), id="1x1"),
    pytest.param((1, 37), id="one-row"),
    pytest.param((37, 1), id="one-column"),
    pytest.param((7, 13), id="7x13"),
    pytest.param((8, 8), id="one-register-block"),
    pytest.param((64, 64), id="one-tile"),
    pytest.param((65, 129), id="tile-edges"),
    pytest.param((128, 3136), id="batch-by-features"),
    pytest.param((3136, 128), id="features-by-batch"),
    pytest.param((33, 1000), id="odd-rows-many-columns"),
]


def _random(shape, dtype, device):
    return (torch.randn(shape, device=device) * 5 + 1).to(dtype)  # no zeros: an unwritten output cannot pass


def test_reference_is_torchs_transpose():
    x = torch.randn(5, 9)
    out = fk.transpose_copy_reference(x)
    assert out.shape == (9, 5) and out.is_contiguous() and torch.equal(out, x.t())
    assert out.data_ptr() != x.data_ptr()
    already = torch.randn(9, 5).t()  # x.t() is already contiguous: still a new tensor
    copy = fk.transpose_copy_reference(already)
    assert torch.equal(copy, already.t()) and copy.data_ptr() != already.data_ptr()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend,device", PARAMS)
def test_matches_the_reference(backend, device, shape):
    x = _random(shape, torch.float32, device)
    poison_allocator(x.numel(), torch.float32, device)
    out = fk.transpose_copy(x, backend=backend)
    assert out.shape == (shape[1], shape[0]) and out.is_contiguous()
    assert torch.equal(out, fk.transpose_copy(x, backend="reference"))
    assert torch.equal(out, x.t())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", PARAMS)
def test_every_float_dtype(backend, device, dtype):
    x = _random((19, 70), dtype, device)
    out = fk.transpose_copy(x, backend=backend)
    assert out.dtype == dtype and torch.equal(out, x.t())


@pytest.mark.parametrize("backend,device", PARAMS)
def test_strided_inputs(backend, device):
    base = _random((40, 90), torch.float32, device)
    for x in (base[3:30:2, 5:77],  # rows and columns skipped
              base[:, 10:75],  # unit-stride rows with a longer row stride
              base.t(),  # column-major: out is base itself, copied
              base[::3, ::4]):
        poison_allocator(x.numel(), torch.float32, device)
        out = fk.transpose_copy(x, backend=backend)
        assert out.is_contiguous() and torch.equal(out, x.t()), x.stride()
        assert out.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("backend,device", PARAMS)
def test_empty(backend, device):
    for shape in ((0, 5), (5, 0), (0, 0)):
        out = fk.transpose_copy(torch.empty(shape, device=device), backend=backend)
        assert out.shape == (shape[1], shape[0])


@pytest.mark.parametrize("backend,device", PARAMS)
def test_gradients(backend, device):
    x = torch.randn(6, 11, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fk.transpose_copy(t, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fk.transpose_copy(t, backend=backend), (x,))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_opcheck(backend, device):
    x = torch.randn(9, 21, device=device)
    if backend != "reference":
        suffix = "_triton" if backend == "triton" else ""
        torch.library.opcheck(getattr(torch.ops.fedspa, "transpose_copy" + suffix), (x,))
    torch.library.opcheck(torch.ops.fedspa.transpose_copy_autograd, (x.requires_grad_(), backend))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_input(backend, device):
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(2, 3, 4\)"):
        fk.transpose_copy(torch.randn(2, 3, 4, device=device), backend=backend)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        fk.transpose_copy(torch.ones(2, 3, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        fk.transpose_copy([[1.0]], backend=backend)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_direct_kernel_calls_check_their_input(backend, device):
    if backend == "reference":
        pytest.skip("the reference is the public function's own check")
    op = getattr(torch.ops.fedspa, "transpose_copy" + ("_triton" if backend == "triton" else ""))
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(torch.randn(3, device=device))
    with pytest.raises(TypeError, match="floating-point|float16, bfloat16, float32 or float64"):
        op(torch.ones(2, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_layout_changes_between_nchw_and_batch_last(backend, device):
    """batch_last: NCHW values as a contiguous (C, H, W, N) tensor; nchw_contiguous: back, from (C, H, W, N) memory
    (or any other layout) to contiguous NCHW. Fresh outputs on every path (contiguous, strided, empty)."""
    x = _random((5, 3, 4, 6), torch.float32, device)
    poison_allocator(x.numel(), torch.float32, device)
    t = fk.batch_last(x, backend=backend)
    assert t.shape == (3, 4, 6, 5) and t.is_contiguous() and torch.equal(t, x.permute(1, 2, 3, 0))
    view = t.permute(3, 0, 1, 2)  # the sparse layers' activations: (C, H, W, N) memory seen as NCHW
    back = fk.nchw_contiguous(view, backend=backend)
    assert back.is_contiguous() and torch.equal(back, x) and back.data_ptr() != t.data_ptr()
    strided = x[:, :, ::2]  # neither layout: torch's copies
    assert torch.equal(fk.batch_last(strided, backend=backend), strided.permute(1, 2, 3, 0))
    assert torch.equal(fk.nchw_contiguous(strided, backend=backend), strided)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert fk.nchw_contiguous(channels_last, backend=backend).is_contiguous()
    assert fk.batch_last(torch.empty(0, 3, 4, 6, device=device), backend=backend).shape == (3, 4, 6, 0)
