"""Direct sparse conv2d: every backend against the dense convolution (torch), forward and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedspa_kernels as fk
from tests.helpers import backend_device_params, poison_allocator

PARAMS = backend_device_params("spconv2d")

# (in_channels, out_channels, (H, W), kernel, stride, padding, dilation)
GEOMETRIES = [
    (3, 5, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 4, (10, 7), (5, 5), (1, 1), (0, 0), (1, 1)),
    (4, 3, (13, 12), (3, 2), (2, 3), (1, 0), (1, 1)),
    (3, 6, (12, 12), (3, 3), (1, 2), (2, 1), (2, 3)),
    (1, 7, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1)),
    (5, 2, (4, 4), (3, 3), (3, 3), (2, 2), (1, 1)),  # padding wider than the taps reach in the corners
]


def _sparse_weight(out_c, in_c, kernel, density, dtype, device):
    dense = torch.randn(out_c, in_c * kernel[0] * kernel[1], dtype=torch.float64)
    mask = torch.rand(dense.shape) < density
    if out_c > 2:
        mask[1] = False  # an output channel with no weights
    return fk.SparseMatrix.from_dense(dense.to(dtype).to(device), mask.to(device))


def _dense_conv(x, S, kernel, bias, stride, padding, dilation):
    w = S.to_dense().double().view(S.shape[0], -1, *kernel)
    return F.conv2d(x.double(), w, None if bias is None else bias.double(), stride, padding, dilation)


def _close(got, expected, tol):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol * scale)


def _skip_slow_triton(backend, device, numel):
    if backend == "triton" and device == "cpu" and numel > 6000:
        pytest.skip("too slow for the Triton CPU interpreter")


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[2] + g[3] + g[4] + g[5] + g[6])))
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_forward_and_gradients_match_dense_conv(backend, device, geometry, density, batch):
    in_c, out_c, hw, kernel, stride, padding, dilation = geometry
    S = _sparse_weight(out_c, in_c, kernel, density, torch.float32, device)
    values = S.values.detach().clone().requires_grad_()
    bias = torch.randn(out_c, device=device, requires_grad=True)
    x = torch.randn(batch, in_c, *hw, device=device, requires_grad=True)
    expected = _dense_conv(x, S, kernel, bias, stride, padding, dilation)
    _skip_slow_triton(backend, device, expected.numel() * max(1, S.nnz))
    poison_allocator(expected.numel(), torch.float32, device)
    out = fk.sparse_conv2d(x, S.with_values(values), kernel, bias, stride, padding, dilation, backend=backend)
    assert out.shape == expected.shape and out.dtype == torch.float32
    _close(out, expected, 2e-5)

    grad_out = torch.randn_like(out)
    poison_allocator(x.numel(), torch.float32, device)
    out.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    w64 = S.to_dense().double().view(out_c, in_c, *kernel).requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    F.conv2d(x64, w64, b64, stride, padding, dilation).backward(grad_out.double())
    _close(x.grad, x64.grad, 2e-5)
    _close(values.grad, w64.grad.reshape(out_c, -1)[S.mask()], 2e-5)
    _close(bias.grad, b64.grad, 2e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_kernel_ops_direct_and_with_perm(backend, device):
    """The raw kernel ops (feature-major layout, values in a permuted order) against their references."""
    kernel, stride, padding, dilation = [3, 3], [2, 1], [1, 1], [1, 2]
    S = _sparse_weight(6, 3, kernel, 0.4, torch.float32, device)
    x_t = torch.randn(3, 9, 10, 4, device=device)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(S.nnz, generator=g).to(device=device, dtype=torch.int32)
    values = torch.randn(S.nnz, device=device)  # values stored in perm order: row order i reads values[perm[i]]
    geometry = (kernel, stride, padding, dilation)
    ref = fk.ops.sparse_conv2d.kernel("reference", "spconv2d")(values, S.crow_indices, S.col_indices, perm, x_t,
                                                                *geometry, True)
    got = fk.ops.sparse_conv2d.kernel(backend, "spconv2d")(values, S.crow_indices, S.col_indices, perm, x_t,
                                                            *geometry, True)
    _close(got, ref, 2e-5)
    grad_out_t = torch.randn_like(ref)
    ref_w = fk.ops.sparse_conv2d.kernel("reference", "spconv2d_weight_grad")(grad_out_t, x_t, S.crow_indices,
                                                                             S.col_indices, perm, *geometry, True)
    got_w = fk.ops.sparse_conv2d.kernel(backend, "spconv2d_weight_grad")(grad_out_t, x_t, S.crow_indices,
                                                                         S.col_indices, perm, *geometry, True)
    _close(got_w, ref_w, 2e-5)
    vals = S.values
    ref_i = fk.ops.sparse_conv2d.kernel("reference", "spconv2d_input_grad")(
        vals, S.ccol_indices, S.row_indices_t, S.perm_t, grad_out_t, [9, 10], *geometry, True)
    got_i = fk.ops.sparse_conv2d.kernel(backend, "spconv2d_input_grad")(
        vals, S.ccol_indices, S.row_indices_t, S.perm_t, grad_out_t, [9, 10], *geometry, True)
    _close(got_i, ref_i, 2e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_noncontiguous_inputs_and_channels_last_batch(backend, device):
    S = _sparse_weight(4, 3, (3, 3), 0.3, torch.float32, device)
    base = torch.randn(6, 3, 10, 16, device=device)
    x = base[::2, :, :, ::2]  # strided in batch and width
    assert not x.is_contiguous()
    expected = _dense_conv(x, S, (3, 3), None, 1, 1, 1)
    _close(fk.sparse_conv2d(x, S, 3, padding=1, backend=backend), expected, 2e-5)
    x_t = x.permute(1, 2, 3, 0)
    out_t = fk.sparse_conv2d(x_t, S, 3, padding=1, backend=backend, channels_last_batch=True)
    _close(out_t, expected.permute(1, 2, 3, 0), 2e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_float64_and_half(backend, device):
    S = _sparse_weight(3, 2, (3, 3), 0.5, torch.float64, device)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, device=device)
    _close(fk.sparse_conv2d(x, S, 3, padding=1, backend=backend), _dense_conv(x, S, (3, 3), None, 1, 1, 1), 1e-10)
    S16 = _sparse_weight(3, 2, (3, 3), 0.5, torch.float16, device)
    x16 = torch.randn(2, 2, 6, 7, device=device).half()
    if backend == "cpp":
        with pytest.raises(TypeError, match="float32 or float64"):
            fk.sparse_conv2d(x16, S16, 3, padding=1, backend=backend)
        return
    _close(fk.sparse_conv2d(x16, S16, 3, padding=1, backend=backend), _dense_conv(x16, S16, (3, 3), None, 1, 1, 1),
           2e-2)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_gradcheck_float64(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("gradcheck's many calls are too slow for the Triton interpreter; covered in float32 above")
    S = _sparse_weight(3, 2, (3, 2), 0.5, torch.float64, device)
    values = S.values.detach().clone().requires_grad_()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda xx, v, b: fk.sparse_conv2d(xx, S.with_values(v), (3, 2), b, (2, 1), (1, 1), (1, 2), backend=backend),
        (x, values, bias))


@pytest.mark.parametrize("backend,device", PARAMS)
def test_opcheck(backend, device):
    S = _sparse_weight(4, 2, (3, 3), 0.4, torch.float32, device)
    x_t = torch.randn(2, 6, 5, 3, device=device)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    if backend != "reference":
        suffix = "_triton" if backend == "triton" else ""
        torch.library.opcheck(getattr(torch.ops.fedspa, "spconv2d" + suffix),
                              (S.values, S.crow_indices, S.col_indices, None, x_t, *geometry, True))
        grad_out_t = torch.randn(4, 6, 5, 3, device=device)
        torch.library.opcheck(getattr(torch.ops.fedspa, "spconv2d_input_grad" + suffix),
                              (S.values, S.ccol_indices, S.row_indices_t, S.perm_t, grad_out_t, [6, 5], *geometry,
                               True))
        torch.library.opcheck(getattr(torch.ops.fedspa, "spconv2d_weight_grad" + suffix),
                              (grad_out_t, x_t, S.crow_indices, S.col_indices, None, *geometry, True))
    values = S.values.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.fedspa.sparse_conv2d,
                          (values, S.crow_indices, S.col_indices, None, S.ccol_indices, S.row_indices_t, S.perm_t,
                           x_t.requires_grad_(), *geometry, backend, True))


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_input_in_direct_op_calls(backend, device):
    """The raw ops check structures and geometry before any kernel reads memory through them."""
    forward = fk.ops.sparse_conv2d.kernel(backend, "spconv2d")
    input_grad = fk.ops.sparse_conv2d.kernel(backend, "spconv2d_input_grad")
    weight_grad = fk.ops.sparse_conv2d.kernel(backend, "spconv2d_weight_grad")
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    crow = torch.tensor([0, 2, 3], device=device)
    col = torch.tensor([0, 30, 1], dtype=torch.int32, device=device)  # 2 channels x 9 taps = 18 columns
    values, x_t = torch.ones(3, device=device), torch.randn(2, 5, 5, 2, device=device)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 30 is outside \[0, 18\)"):
        forward(values, crow, col, None, x_t, *geometry, True)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 30 is outside \[0, 18\)"):
        weight_grad(torch.randn(2, 5, 5, 2, device=device), x_t, crow, col, None, *geometry, True)
    col = torch.tensor([0, 17, 1], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"stride.*\[0, 1\]"):
        forward(values, crow, col, None, x_t, [3, 3], [0, 1], [1, 1], [1, 1], True)
    with pytest.raises(ValueError, match=r"kernel_size.*\[3\]"):
        forward(values, crow, col, None, x_t, [3], [1, 1], [1, 1], [1, 1], True)
    with pytest.raises(ValueError, match="gives an empty output"):
        forward(values, crow, col, None, x_t, [7, 7], [1, 1], [0, 0], [1, 1], True)
    with pytest.raises(TypeError, match="input_t is (torch.float64|Double) but the weights are (torch.float32|Float)"):
        forward(values, crow, col, None, x_t.double(), *geometry, True)
    with pytest.raises(ValueError, match=r"input_t must be 4-D \(C, H, W, N\)"):
        forward(values, crow, col, None, x_t[0], *geometry, True)
    with pytest.raises(ValueError, match="grad_out_t is"):
        weight_grad(torch.randn(2, 4, 5, 2, device=device), x_t, crow, col, None, *geometry, True)
    S = fk.SparseMatrix.from_dense(torch.randn(2, 18, device=device), torch.rand(2, 18, device=device) < 0.5)
    with pytest.raises(ValueError, match=r"an input of \[6, 6\] gives (\(6, 6\)|6x6) outputs"):
        input_grad(S.values, S.ccol_indices, S.row_indices_t, S.perm_t, torch.randn(2, 5, 5, 2, device=device),
                   [6, 6], *geometry, True)
    with pytest.raises(ValueError, match="not a multiple of the kernel's 4 taps"):
        input_grad(S.values, S.ccol_indices, S.row_indices_t, S.perm_t, torch.randn(2, 5, 5, 2, device=device),
                   [5, 5], [2, 2], [1, 1], [0, 0], [1, 1], True)


def test_public_api_errors():
    S = fk.SparseMatrix.from_dense(torch.randn(4, 18), torch.rand(4, 18) < 0.5)
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match="the weight has 18 columns but the input has 3 channels"):
        fk.sparse_conv2d(torch.randn(2, 3, 5, 5), S, 3)
    with pytest.raises(TypeError, match="weight must be a SparseMatrix"):
        fk.sparse_conv2d(x, torch.randn(4, 18), 3)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        fk.sparse_conv2d(x, S, 3, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="input must be 4-D"):
        fk.sparse_conv2d(x[0], S, 3)
    with pytest.raises(TypeError, match="input is torch.float64 but the weight is torch.float32"):
        fk.sparse_conv2d(x.double(), S, 3)
    with pytest.raises(ValueError, match="input is on meta but the weight is on cpu"):
        fk.sparse_conv2d(x.to("meta"), S, 3)
    with pytest.raises(ValueError, match=r"bias must be \(4,\)"):
        fk.sparse_conv2d(x, S, 3, torch.randn(1))
    with pytest.raises(ValueError, match="gives an empty output"):
        fk.sparse_conv2d(x, S, 3, dilation=3)
    with pytest.raises(ValueError, match="unknown backend 'mkl'"):
        fk.sparse_conv2d(x, S, 3, backend="mkl")
