"""Direct sparse conv2d: every backend against the dense convolution (torch), forward and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fedspa_kernels as fk
from tests.helpers import backend_device_params, poison_allocator

PARAMS = backend_device_params("sparse_conv2d")
OPS = {"forward": fk.ops.sparse_conv2d.SPARSE_CONV2D, "input_grad": fk.ops.sparse_conv2d.SPARSE_CONV2D_INPUT_GRAD,
       "weight_grad": fk.ops.sparse_conv2d.SPARSE_CONV2D_WEIGHT_GRAD}

# (in_channels, out_channels, (H, W), kernel, stride, padding, dilation)
GEOMETRIES = [
    (3, 5, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 4, (10, 7), (5, 5), (1, 1), (0, 0), (1, 1)),
    (4, 3, (13, 12), (3, 2), (2, 3), (1, 0), (1, 1)),
    (3, 6, (12, 12), (3, 3), (1, 2), (2, 1), (2, 3)),
    (1, 7, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1)),
    (5, 2, (4, 4), (3, 3), (3, 3), (2, 2), (1, 1)),  # padding wider than the taps reach in the corners
    (4, 6, (11, 9), (1, 1), (2, 2), (0, 0), (1, 1)),  # a 1x1 downsample: odd sizes, the last pixel read
    (3, 5, (10, 13), (1, 1), (3, 2), (0, 0), (2, 1)),  # uneven strides (the dilation of a 1x1 kernel is moot)
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
def test_kernel_ops_direct(backend, device):
    """The raw kernel ops (feature-major layout; every op on the CSR order) against their references, with the
    pattern's columns in int16 (what SparseMatrix stores) and int32: right with both, and bit-identical."""
    kernel, stride, padding, dilation = [3, 3], [2, 1], [1, 1], [1, 2]
    S = _sparse_weight(6, 3, kernel, 0.4, torch.float32, device)
    assert S.col_indices.dtype == torch.int16
    x_t = torch.randn(3, 9, 10, 4, device=device)
    values = torch.randn(S.nnz, device=device)
    geometry = (kernel, stride, padding, dilation)
    forward, input_grad, weight_grad = OPS["forward"], OPS["input_grad"], OPS["weight_grad"]
    results = []
    for col in (S.col_indices, S.col_indices.to(torch.int32)):
        ref = forward.kernel("reference")(values, S.crow_indices, col, x_t, *geometry)
        poison_allocator(ref.numel(), torch.float32, device)
        got = forward.kernel(backend)(values, S.crow_indices, col, x_t, *geometry)
        _close(got, ref, 2e-5)
        grad_out_t = torch.randn_like(ref) if not results else results[0][3]
        ref_w = weight_grad.kernel("reference")(grad_out_t, x_t, S.crow_indices, col, *geometry)
        poison_allocator(ref_w.numel(), torch.float32, device)
        got_w = weight_grad.kernel(backend)(grad_out_t, x_t, S.crow_indices, col, *geometry)
        _close(got_w, ref_w, 2e-5)
        ref_i = input_grad.kernel("reference")(values, S.crow_indices, col, grad_out_t, [3, 9, 10], *geometry)
        poison_allocator(ref_i.numel(), torch.float32, device)
        got_i = input_grad.kernel(backend)(values, S.crow_indices, col, grad_out_t, [3, 9, 10], *geometry)
        _close(got_i, ref_i, 2e-5)
        results.append((got, got_w, got_i, grad_out_t))
    for got16, got32 in zip(*results):
        assert torch.equal(got16, got32)


def test_the_references_equal_torchs_dense_convolution():
    """The sparse-semantics references are the dense convolution and its gradients where everything is finite."""
    kernel, stride, padding, dilation = [3, 2], [2, 1], [2, 1], [1, 2]
    S = _sparse_weight(5, 3, kernel, 0.4, torch.float64, "cpu")
    x = torch.randn(4, 3, 11, 9, dtype=torch.float64, requires_grad=True)
    w = S.to_dense().view(5, 3, *kernel).requires_grad_()
    out = F.conv2d(x, w, None, stride, padding, dilation)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    geometry = (kernel, stride, padding, dilation)
    x_t, g_t = x.detach().permute(1, 2, 3, 0), grad_out.permute(1, 2, 3, 0)
    got = fk.ops.sparse_conv2d.sparse_conv2d_reference(S.values, S.crow_indices, S.col_indices, x_t, *geometry)
    torch.testing.assert_close(got, out.detach().permute(1, 2, 3, 0))
    got_w = fk.ops.sparse_conv2d.sparse_conv2d_weight_grad_reference(g_t, x_t, S.crow_indices, S.col_indices,
                                                                      *geometry)
    torch.testing.assert_close(got_w, w.grad.reshape(5, -1)[S.mask()])
    got_i = fk.ops.sparse_conv2d.sparse_conv2d_input_grad_reference(S.values, S.crow_indices, S.col_indices, g_t,
                                                                     [3, 11, 9], *geometry)
    torch.testing.assert_close(got_i, x.grad.permute(1, 2, 3, 0))


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
def test_an_nchw_input_gets_its_output_and_gradient_in_nchw(backend, device):
    """The kernels work in (C, H, W, N); an NCHW caller gets its output and its input gradient in NCHW, the layout of its
    tensor (left in (C, H, W, N), autograd's leaf accumulation or the caller's elementwise backward ops copy it with
    torch's slow transposing loop: 47 ms at 128 x 64 x 32 x 32 on one thread). Values as before, for an NCHW
    gradient of the output and for one in the kernels' layout."""
    S = _sparse_weight(4, 3, (3, 3), 0.4, torch.float32, device)
    bias = torch.randn(4, device=device)
    x = torch.randn(5, 3, 7, 9, device=device, requires_grad=True)
    out = fk.sparse_conv2d(x, S, 3, bias, padding=1, backend=backend)
    _close(out, _dense_conv(x.detach(), S, (3, 3), bias, 1, 1, 1), 2e-5)
    if device == "cpu":
        assert out.is_contiguous(), out.stride()  # NCHW out too (the next op, e.g. a GroupNorm, reads NCHW fast)
        from_kernels_layout = fk.sparse_conv2d(x.detach().permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2), S, 3,
                                               bias, padding=1, backend=backend)
        assert from_kernels_layout.permute(1, 2, 3, 0).is_contiguous(), from_kernels_layout.stride()  # stays so
    w = S.to_dense().view(4, 3, 3, 3)
    for upstream in (torch.randn(out.shape, device=device),
                     torch.randn(4, 7, 9, 5, device=device).permute(3, 0, 1, 2)):
        grad_x, = torch.autograd.grad(out, x, upstream, retain_graph=True)
        if device == "cpu":
            assert grad_x.is_contiguous(), grad_x.stride()
        expected, = torch.autograd.grad(F.conv2d(x, w, bias, padding=1), x, upstream)
        _close(grad_x, expected, 2e-5)


@pytest.mark.parametrize("backend,device", PARAMS)
def test_an_nchw_input_is_kept_for_backward_without_a_copy(backend, device):
    """What autograd keeps for the backward pass: the pattern, the values and the caller's own input (a view of
    it), never a transposed copy of the activation (which would add one activation per layer to training memory)."""
    S = _sparse_weight(4, 3, (3, 3), 0.4, torch.float32, device)
    x = torch.randn(5, 3, 7, 9, device=device, requires_grad=True)
    values = S.values.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fk.sparse_conv2d(x, S.with_values(values), 3, padding=1, backend=backend)
    activations = [t for t in saved if t.numel() >= x.numel()]
    assert activations, "the weight gradient needs the input"
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in activations)


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
        torch.library.opcheck(getattr(torch.ops.fedspa, "sparse_conv2d" + suffix),
                              (S.values, S.crow_indices, S.col_indices, x_t, *geometry))
        grad_out_t = torch.randn(4, 6, 5, 3, device=device)
        torch.library.opcheck(getattr(torch.ops.fedspa, "sparse_conv2d_input_grad" + suffix),
                              (S.values, S.crow_indices, S.col_indices, grad_out_t, [2, 6, 5], *geometry))
        torch.library.opcheck(getattr(torch.ops.fedspa, "sparse_conv2d_weight_grad" + suffix),
                              (grad_out_t, x_t, S.crow_indices, S.col_indices, *geometry))
    values = S.values.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.fedspa.sparse_conv2d_autograd,
                          (values, S.crow_indices, S.col_indices, x_t.requires_grad_(), *geometry, backend))


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_bad_input_in_direct_op_calls(backend, device, col_dtype):
    """The raw ops check structures and geometry before any kernel reads memory through them."""
    forward, input_grad, weight_grad = (OPS[name].kernel(backend) for name in ("forward", "input_grad", "weight_grad"))
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    crow = torch.tensor([0, 2, 3], device=device)
    col = torch.tensor([0, 30, 1], dtype=col_dtype, device=device)  # 2 channels x 9 taps = 18 columns
    values, x_t = torch.ones(3, device=device), torch.randn(2, 5, 5, 2, device=device)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 30 is outside \[0, 18\)"):
        forward(values, crow, col, x_t, *geometry)
    with pytest.raises(ValueError, match=r"col_indices\[1\] = 30 is outside \[0, 18\)"):
        weight_grad(torch.randn(2, 5, 5, 2, device=device), x_t, crow, col, *geometry)
    col = torch.tensor([0, 17, 1], dtype=col_dtype, device=device)
    with pytest.raises(ValueError, match=r"stride.*\[0, 1\]"):
        forward(values, crow, col, x_t, [3, 3], [0, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"kernel_size.*\[3\]"):
        forward(values, crow, col, x_t, [3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="gives an empty output"):
        forward(values, crow, col, x_t, [7, 7], [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="input_t is (torch.float64|Double) but the weights are (torch.float32|Float)"):
        forward(values, crow, col, x_t.double(), *geometry)
    with pytest.raises(ValueError, match=r"input_t must be 4-D \(C, H, W, N\)"):
        forward(values, crow, col, x_t[0], *geometry)
    with pytest.raises(ValueError, match="grad_out_t is"):
        weight_grad(torch.randn(2, 4, 5, 2, device=device), x_t, crow, col, *geometry)
    S = fk.SparseMatrix.from_dense(torch.randn(2, 18, device=device), torch.rand(2, 18, device=device) < 0.5)
    grad_out_t = torch.randn(2, 5, 5, 2, device=device)
    with pytest.raises(ValueError, match=r"an input of \[6, 6\] gives (\(6, 6\)|6x6) outputs"):
        input_grad(S.values, S.crow_indices, S.col_indices, grad_out_t, [2, 6, 6], *geometry)
    with pytest.raises(ValueError, match=r"input_chw must be three integers"):
        input_grad(S.values, S.crow_indices, S.col_indices, grad_out_t, [5, 5], *geometry)
    with pytest.raises(ValueError, match=r"the pattern has 2 rows \(output channels\) but grad_out_t is"):
        input_grad(S.values, S.crow_indices, S.col_indices, torch.randn(3, 5, 5, 2, device=device), [2, 5, 5],
                   *geometry)
    bad = S.col_indices.clone()
    bad[0] = 30
    with pytest.raises(ValueError, match=r"col_indices\[0\] = 30 is outside \[0, 18\)"):
        input_grad(S.values, S.crow_indices, bad, grad_out_t, [2, 5, 5], *geometry)
    with pytest.raises(ValueError, match=r"col_indices\[\d+\] = \d+ is outside \[0, 9\)"):  # 1 channel: 9 columns
        input_grad(S.values, S.crow_indices, S.col_indices, grad_out_t, [1, 5, 5], *geometry)


def test_public_api_errors():
    S = fk.SparseMatrix.from_dense(torch.randn(4, 18), torch.rand(4, 18) < 0.5)
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match="the weight has 18 columns but the input has 3 channels"):
        fk.sparse_conv2d(torch.randn(2, 3, 5, 5), S, 3)
    with pytest.raises(TypeError, match="weight must be a SparseMatrix"):
        fk.sparse_conv2d(x, torch.randn(4, 18), 3)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        fk.sparse_conv2d(x, S, 3, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="input must be a 4-D tensor"):
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


@pytest.mark.parametrize("backend,device", PARAMS)
def test_nan_input_reaches_exactly_the_outputs_whose_taps_read_it(backend, device):
    """Sparse semantics: a NaN input pixel spreads only through stored weights, on every backend."""
    S = _sparse_weight(3, 2, (3, 3), 0.3, torch.float32, device)
    x = torch.randn(1, 2, 6, 6, device=device)
    x[0, 1, 2, 3] = float("nan")
    out = fk.sparse_conv2d(x, S, 3, padding=1, backend=backend).cpu()
    # which outputs read input (c=1, 2, 3): output (o, y, x) reads it through tap (ky, kx) = (2 - y + 1, 3 - x + 1)
    expected = torch.zeros(3, 6, 6, dtype=torch.bool)
    for o in range(3):
        for ky in range(3):
            for kx in range(3):
                y, xx = 2 + 1 - ky, 3 + 1 - kx
                if 0 <= y < 6 and 0 <= xx < 6 and S.mask().cpu().view(3, 2, 3, 3)[o, 1, ky, kx]:
                    expected[o, y, xx] = True
    assert torch.equal(torch.isnan(out[0]), expected)
    reference = fk.sparse_conv2d(x.cpu(), S.to("cpu"), 3, padding=1, backend="reference")
    torch.testing.assert_close(out, reference, equal_nan=True, rtol=2e-5, atol=2e-5)


def _forward_and_input_grad_match_the_references(backend, device, S, x_t, geo):
    """The forward on `x_t` and the input gradient of a random output gradient, each against its reference (fp32)."""
    in_c, *hw = x_t.shape[:3]
    forward, input_grad = OPS["forward"], OPS["input_grad"]
    ref = forward.kernel("reference")(S.values, S.crow_indices, S.col_indices, x_t, *geo)
    poison_allocator(ref.numel(), torch.float32, device)
    _close(forward.kernel(backend)(S.values, S.crow_indices, S.col_indices, x_t, *geo), ref, 2e-5)
    grad_out_t = torch.randn_like(ref)
    ref_i = input_grad.kernel("reference")(S.values, S.crow_indices, S.col_indices, grad_out_t, [in_c, *hw], *geo)
    poison_allocator(ref_i.numel(), torch.float32, device)
    _close(input_grad.kernel(backend)(S.values, S.crow_indices, S.col_indices, grad_out_t, [in_c, *hw], *geo), ref_i,
           2e-5)


# operands beyond the CPU kernels' 4 MB tiling threshold: (in_c, out_c, (H, W), kernel, stride, padding, dilation, N)
LARGE = [
    (16, 24, (45, 37), (3, 3), (1, 1), (1, 1), (1, 1), 72),  # two batch blocks, the second 8 wide
    (20, 16, (40, 40), (3, 3), (2, 2), (1, 1), (1, 1), 64),  # stride 2
    (24, 80, (33, 33), (1, 1), (2, 2), (0, 0), (1, 1), 48),  # a 1x1 downsample, both operands above it
    (20, 16, (36, 38), (5, 3), (1, 2), (2, 0), (2, 1), 40),  # dilation, uneven stride and padding
]


@pytest.mark.parametrize("geometry", LARGE, ids=lambda g: "x".join(map(str, g[2] + g[3] + g[4] + (g[7],))))
@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] == "cpp"])
def test_spatially_tiled_cpu_kernels_match_the_references(backend, device, geometry):
    """Large activations take the row-tiled CPU paths (forward and input gradient); they must agree with the
    references exactly like the small ones, tails of batch and rows included."""
    in_c, out_c, hw, kernel, stride, padding, dilation, batch = geometry
    S = _sparse_weight(out_c, in_c, list(kernel), 0.2, torch.float32, device)
    geo = (list(kernel), list(stride), list(padding), list(dilation))
    _forward_and_input_grad_match_the_references(backend, device, S, torch.randn(in_c, *hw, batch, device=device),
                                                 geo)


# Batch blocks narrower than 64 (whole 8-wide vectors: 8, 24 = 16 + 8, 32, 56 = 32 + 16 + 8) run two neighbouring
# positions at once where both are inside: odd widths leave a last position alone, borders take the checked path.
@pytest.mark.parametrize("batch", [8, 24, 32, 56])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[2] + g[3] + g[4] + g[5] + g[6])))
@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] == "cpp"])
def test_narrow_batch_blocks_match_the_references(backend, device, geometry, batch):
    in_c, out_c, hw, kernel, stride, padding, dilation = geometry
    S = _sparse_weight(out_c, in_c, list(kernel), 0.5, torch.float32, device)
    geo = (list(kernel), list(stride), list(padding), list(dilation))
    _forward_and_input_grad_match_the_references(backend, device, S, torch.randn(in_c, *hw, batch, device=device),
                                                 geo)


def _activation(shape, batch, layout, device):
    """A (C, H, W, N) activation: contiguous, an NCHW tensor's permuted view, or strided in width and batch."""
    if layout == "contiguous":
        return torch.randn(*shape, batch, device=device)
    if layout == "nchw_view":
        return torch.randn(batch, *shape, device=device).permute(1, 2, 3, 0)
    c, h, w = shape
    return torch.randn(c, h, w + 3, 2 * batch, device=device)[:, :, 1:1 + w, ::2]


class _FedspaCalls(TorchDispatchMode):
    """Records the fedspa ops called below autograd, with their arguments' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list]] = []
        self.raw: list[tuple[str, tuple]] = []  # the same calls with their arguments themselves

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fedspa":
            self.calls.append((func.__name__.split(".")[0],
                               [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]))
            self.raw.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


# fp32 batches wider than 64 run in the C++ kernels as contiguous 64-wide chunks: two whole chunks and a 2-wide tail;
# one whole chunk and a 36-wide tail (not a multiple of 8). The weight gradient of (C, H, W, N) operands goes in
# chunks only above 256 KB planes: the 24x23 geometry at batch 130 (287 KB) does, at 100 (220 KB) it does not.
@pytest.mark.parametrize("layout", ["contiguous", "nchw_view", "strided"])
@pytest.mark.parametrize("batch", [130, 100])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[6],
                                      (3, 5, (24, 23), (3, 3), (1, 1), (1, 1), (1, 1))],
                         ids=lambda g: "x".join(map(str, g[2] + g[3] + g[4])))
@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] == "cpp"])
def test_wide_batches_match_the_references_in_every_layout(backend, device, geometry, batch, layout):
    """Each chunk writes only its own slice of the output and of the input gradient, and the weight gradient sums
    every chunk's share: all three kernels agree with the references for every input layout."""
    in_c, out_c, hw, kernel, stride, padding, dilation = geometry
    S = _sparse_weight(out_c, in_c, list(kernel), 0.4, torch.float32, device)
    geo = (list(kernel), list(stride), list(padding), list(dilation))
    x_t = _activation((in_c, *hw), batch, layout, device)
    forward, input_grad, weight_grad = OPS["forward"], OPS["input_grad"], OPS["weight_grad"]
    ref = forward.kernel("reference")(S.values, S.crow_indices, S.col_indices, x_t.contiguous(), *geo)
    poison_allocator(ref.numel(), torch.float32, device)
    _close(forward.kernel(backend)(S.values, S.crow_indices, S.col_indices, x_t, *geo), ref, 2e-5)
    grad_out_t = _activation(tuple(ref.shape[:3]), batch, layout, device)
    ref_i = input_grad.kernel("reference")(S.values, S.crow_indices, S.col_indices, grad_out_t.contiguous(),
                                           [in_c, *hw], *geo)
    poison_allocator(ref_i.numel(), torch.float32, device)
    _close(input_grad.kernel(backend)(S.values, S.crow_indices, S.col_indices, grad_out_t, [in_c, *hw], *geo), ref_i,
           2e-5)
    ref_w = weight_grad.kernel("reference")(grad_out_t.double(), x_t.double(), S.crow_indices, S.col_indices, *geo)
    poison_allocator(S.nnz, torch.float32, device)
    _close(weight_grad.kernel(backend)(grad_out_t, x_t, S.crow_indices, S.col_indices, *geo), ref_w, 2e-5)


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2]],
                         ids=lambda g: "x".join(map(str, g[2] + g[3] + g[4])))
@pytest.mark.parametrize("batch", [100, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] == "cpp"])
def test_a_wide_nchw_batch_trains_like_the_dense_conv(backend, device, dtype, batch, geometry):
    """An NCHW batch of 100 (a 64-wide chunk and a 36-wide tail) or 130 (two chunks and a 2-wide tail) through
    autograd: fp32 runs the backward chunk by chunk, fp64 on one transposed copy; output, input gradient (in NCHW),
    weight and bias gradients match the dense convolution."""
    in_c, out_c, hw, kernel, stride, padding, dilation = geometry
    S = _sparse_weight(out_c, in_c, kernel, 0.4, dtype, device)
    values = S.values.detach().clone().requires_grad_()
    weight = S.with_values(values)
    bias = torch.randn(out_c, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(batch, in_c, *hw, dtype=dtype, device=device, requires_grad=True)
    out = fk.sparse_conv2d(x, weight, kernel, bias, stride, padding, dilation, backend=backend)
    expected = _dense_conv(x, S, kernel, bias, stride, padding, dilation)
    _close(out, expected, 2e-5)
    dy = torch.randn(out.shape, dtype=dtype, device=device)
    poison_allocator(x.numel(), dtype, device)
    out.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = S.to_dense().double().view(out_c, in_c, *kernel).requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    F.conv2d(x64, w64, b64, stride, padding, dilation).backward(dy.double())
    assert x.grad.is_contiguous()
    _close(x.grad, x64.grad, 2e-5)
    _close(values.grad, w64.grad.reshape(out_c, -1)[S.mask()], 2e-5)
    _close(bias.grad, b64.grad, 2e-5)


@pytest.mark.parametrize("backend,device", [p for p in PARAMS if p.values[0] == "cpp"])
def test_a_wide_nchw_batch_transposes_each_output_gradient_chunk_once(backend, device):
    """The backward of an NCHW fp32 batch wider than 64 hands both gradient kernels the same transposed 64-wide chunk
    of the output gradient (each kernel alone would transpose it again), and the input gradient's chunks go into
    one NCHW tensor, never a whole (C, H, W, N) one."""
    S = _sparse_weight(5, 3, (3, 3), 0.4, torch.float32, device)
    x = torch.randn(130, 3, 9, 11, device=device, requires_grad=True)
    values = S.values.detach().clone().requires_grad_()
    with _FedspaCalls() as seen:
        out = fk.sparse_conv2d(x, S.with_values(values), 3, None, 1, 1, backend=backend)
        out.backward(torch.randn(out.shape, device=device))  # an NCHW gradient (randn_like: the output's layout)
    weight_grads = [args for name, args in seen.raw if name == "sparse_conv2d_weight_grad"]
    input_grads = [args for name, args in seen.raw if name == "sparse_conv2d_input_grad"]
    assert [a[0].shape[3] for a in weight_grads] == [64, 64, 2], seen.calls
    assert [a[3].data_ptr() for a in input_grads] == [a[0].data_ptr() for a in weight_grads]
    assert all(a[0].is_contiguous() for a in weight_grads)
    assert not [args for name, args in seen.calls if name == "transpose_copy" and args[0] == (130, 3 * 9 * 11)]
    assert not [args for name, args in seen.calls if name == "transpose_copy" and args[0] == (3 * 9 * 11, 130)]


@pytest.mark.parametrize("backend,device", PARAMS)
def test_a_strided_1x1_conv_in_the_kernels_layout_matches_dense(backend, device):
    """channels_last_batch input (C, H, W, N), non-contiguous as a permuted NCHW tensor is: a strided 1x1
    convolution gives the dense result and input gradient in that layout too."""
    S = _sparse_weight(6, 4, (1, 1), 0.5, torch.float32, device)
    x = torch.randn(5, 4, 9, 12, device=device, requires_grad=True)
    out_t = fk.sparse_conv2d(x.permute(1, 2, 3, 0), S, (1, 1), None, (2, 3), 0, 1, backend=backend,
                             channels_last_batch=True)
    expected = _dense_conv(x, S, (1, 1), None, (2, 3), 0, 1)
    _close(out_t.permute(3, 0, 1, 2), expected, 2e-5)
    grad = torch.randn_like(out_t)
    out_t.backward(grad)
    x64 = x.detach().double().requires_grad_()
    _dense_conv(x64, S, (1, 1), None, (2, 3), 0, 1).backward(grad.permute(3, 0, 1, 2).double())
    _close(x.grad, x64.grad, 2e-5)
    assert torch.all(x.grad[:, :, 1::2] == 0) and torch.all(x.grad[:, :, :, 1::3] == 0)  # pixels never read


@pytest.mark.parametrize("channels_last_batch", [False, True])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_a_strided_1x1_conv_runs_the_kernels_on_its_subsample_only(backend, device, channels_last_batch):
    """A 1x1 convolution with stride s reads every s-th row and column only: the kernels get that subsample at
    stride 1, so neither the input's layout change nor its gradient touches the positions never read."""
    S = _sparse_weight(6, 4, (1, 1), 0.5, torch.float32, device)
    x = torch.randn(5, 4, 9, 12, device=device, requires_grad=True)
    with _FedspaCalls() as seen:
        out = fk.sparse_conv2d(x.permute(1, 2, 3, 0) if channels_last_batch else x, S, 1, None, (2, 3),
                               backend=backend, channels_last_batch=channels_last_batch)
        out = out.permute(3, 0, 1, 2) if channels_last_batch else out
        grad = torch.randn_like(out)
        out.backward(grad)
    forward = [args for name, args in seen.calls if name == "sparse_conv2d_autograd"]
    assert len(forward) == 1 and forward[0][3] == (4, 5, 4, 5) and forward[0][5] == [1, 1], forward
    input_grads = [args for name, args in seen.calls if name == "sparse_conv2d_input_grad"]  # native backends
    assert len(input_grads) == (backend in ("cpp", "cuda")), seen.calls
    assert all(args[4] == [4, 5, 4] and args[5] == [1, 1] for args in input_grads), input_grads
    x64 = x.detach().double().requires_grad_()
    expected = _dense_conv(x64, S, (1, 1), None, (2, 3), 0, 1)
    _close(out, expected, 2e-5)
    expected.backward(grad.double())
    _close(x.grad, x64.grad, 2e-5)
    assert x.grad.shape == x.shape and torch.all(x.grad[:, :, 1::2] == 0) and torch.all(x.grad[:, :, :, 1::3] == 0)


@pytest.mark.parametrize("hw", [(1, 1), (2, 1)])
@pytest.mark.parametrize("backend,device", PARAMS)
def test_a_strided_1x1_conv_of_a_one_pixel_wide_input(backend, device, hw):
    """The subsample of a 1-pixel-wide input is contiguous already: it is still a copy (the input's gradient and
    storage stay the caller's), and the results match the dense convolution."""
    S = _sparse_weight(6, 4, (1, 1), 0.5, torch.float32, device)
    x = torch.randn(3, 4, *hw, device=device, requires_grad=True)
    out = fk.sparse_conv2d(x, S, 1, None, 2, backend=backend)
    x64 = x.detach().double().requires_grad_()
    expected = _dense_conv(x64, S, (1, 1), None, (2, 2), 0, 1)
    _close(out, expected, 2e-5)
    subsample = fk.ops.sparse_conv2d._Subsample.apply(x, 2, [2, 2])
    assert subsample.is_contiguous() and subsample.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    _close(x.grad, x64.grad, 2e-5)


# (in_c, out_c, (H, W), kernel, stride, padding, dilation): the weight gradient's cases. The C++ kernel sums an
# output channel's nonzeros together, up to 8 at a time across input channels, over the positions where all of them
# land inside the input, then each over the rest of its own positions.
WEIGHT_GRAD_GEOMETRIES = [
    (3, 4, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),  # 27 a row at density 1: groups of 8 across channels, then 3
    (1, 2, (6, 7), (3, 3), (1, 1), (1, 1), (1, 1)),  # 9 a row: a group of 8, then the last one alone
    (2, 3, (9, 8), (5, 5), (1, 1), (2, 2), (1, 1)),  # 50 a row: six groups of 8 and one of 2, wide padding borders
    (12, 3, (7, 6), (1, 1), (2, 2), (0, 0), (1, 1)),  # 1x1 stride 2: one tap of 12 channels, grouped 8 + 4
    (2, 3, (3, 3), (3, 3), (1, 1), (2, 2), (2, 2)),  # taps whose positions do not overlap: no common inner region
    (2, 3, (1, 5), (3, 3), (2, 1), (1, 1), (1, 1)),  # taps that never land inside the input (gradient 0)
    (3, 2, (10, 11), (3, 2), (2, 3), (1, 0), (1, 2)),  # strides, uneven kernel, padding and dilation
]


@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("batch", [8, 37, 64])  # whole vectors; 4-vector steps with a 5-wide tail; 4-vector steps
@pytest.mark.parametrize("geometry", WEIGHT_GRAD_GEOMETRIES,
                         ids=lambda g: "x".join(map(str, g[2] + g[3] + g[5] + g[6])))
@pytest.mark.parametrize("backend,device", PARAMS)
def test_weight_gradient_across_tap_groups_borders_and_batch_tails(backend, device, geometry, batch, density):
    in_c, out_c, hw, kernel, stride, padding, dilation = geometry
    S = _sparse_weight(out_c, in_c, kernel, density, torch.float32, device)
    geo = (list(kernel), list(stride), list(padding), list(dilation))
    x_t = torch.randn(in_c, *hw, batch, device=device)
    out_t = OPS["forward"].kernel("reference")(S.values, S.crow_indices, S.col_indices, x_t, *geo)
    _skip_slow_triton(backend, device, out_t.numel() * max(1, S.nnz) // 4)
    grad_out_t = torch.randn_like(out_t)
    expected = OPS["weight_grad"].kernel("reference")(grad_out_t.double(), x_t.double(), S.crow_indices,
                                                      S.col_indices, *geo)
    poison_allocator(S.nnz, torch.float32, device)
    got = OPS["weight_grad"].kernel(backend)(grad_out_t, x_t, S.crow_indices, S.col_indices, *geo)
    _close(got, expected, 2e-5)
    if geometry[2] == (1, 5):
        taps = S.col_indices.long() % 9
        assert torch.all(got[(taps // 3 == 0) | (taps // 3 == 2)] == 0)  # rows ky = 0 and 2 never land
