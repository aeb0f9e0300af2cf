"""Triton kernels of the direct sparse convolution (fedspa::sparse_conv2d*_triton); activations (C, H, W, N).

- forward: one program per (output channel, output position, BLOCK_N batch elements); the channel's nonzeros
  are decoded BLOCK_NZ at a time into (c, ky, kx) taps and their input batch vectors gathered as a
  (BLOCK_NZ x BLOCK_N) tile (taps outside the input are masked off: zero padding).
- input gradient: one program per (input channel, input position, BLOCK_N); for each kernel tap whose output
  position exists, the entries of the weight's column (c, ky, kx) are gathered the same way, from the transposed
  order the launcher builds for the call (one stable sort of the CSR columns).
- weight gradient: one program per nonzero; the products of grad_out and input batch vectors are summed over
  the positions where the tap lands inside the input, BLOCK_P positions x BLOCK_N batch elements at a time.

Accumulates in fp32 (fp64 for fp64); exact products, no TF32. The launchers check the pattern (fedspa_kernels._checks)
before any kernel reads through it. Reference: fedspa_kernels/ops/sparse_conv2d.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import (check_conv_forward_inputs, check_conv_input_grad_inputs, check_conv_weight_grad_inputs,
                       csr_transpose, output_hw, row_of_each_nonzero)
from ._launch import accumulator, check_device

_BLOCK_NZ = 32
_BLOCK_N = 32
_BLOCK_P = 32


@triton.jit
def _forward_kernel(values_ptr, crow_ptr, col_ptr, in_ptr, out_ptr,
                    H, W, N, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
                    ACC: tl.constexpr, BLOCK_NZ: tl.constexpr, BLOCK_N: tl.constexpr):
    o = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    y0 = (pos // OW) * SH - PH
    x0 = (pos % OW) * SW - PW
    start = tl.load(crow_ptr + o)
    end = tl.load(crow_ptr + o + 1)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        k_live = ks < end
        j = tl.load(col_ptr + ks, mask=k_live, other=0).to(tl.int64)
        c = j // (KH * KW)
        r = j % (KH * KW)
        iy = y0 + (r // KW) * DH
        ix = x0 + (r % KW) * DW
        inside = k_live & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        v = tl.load(values_ptr + ks, mask=inside, other=0.0).to(ACC)
        rows = ((c * H + iy) * W + ix) * N
        tile = tl.load(in_ptr + rows[:, None] + offs_n[None, :], mask=inside[:, None] & n_live[None, :],
                       other=0.0).to(ACC)
        acc += tl.sum(v[:, None] * tile, axis=0)
    tl.store(out_ptr + (o * OH * OW + pos) * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_live)


@triton.jit
def _input_grad_kernel(values_ptr, tcrow_ptr, tcol_ptr, gout_ptr, gin_ptr,
                       H, W, N, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
                       ACC: tl.constexpr, BLOCK_NZ: tl.constexpr, BLOCK_N: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = offs_n < N
    iy = pos // W
    ix = pos % W
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for ky in range(0, KH):
        ty = iy + PH - ky * DH
        oy = ty // SH
        y_ok = (ty >= 0) & (ty % SH == 0) & (oy < OH)
        for kx in range(0, KW):
            tx = ix + PW - kx * DW
            ox = tx // SW
            ok = y_ok & (tx >= 0) & (tx % SW == 0) & (ox < OW)
            j = (c * KH + ky) * KW + kx
            start = tl.load(tcrow_ptr + j)
            end = tl.where(ok, tl.load(tcrow_ptr + j + 1), start)
            for t0 in range(start, end, BLOCK_NZ):
                ts = t0 + tl.arange(0, BLOCK_NZ)
                t_live = ts < end
                o = tl.load(tcol_ptr + ts, mask=t_live, other=0).to(tl.int64)
                v = tl.load(values_ptr + ts, mask=t_live, other=0.0).to(ACC)
                rows = ((o * OH + oy) * OW + ox) * N
                tile = tl.load(gout_ptr + rows[:, None] + offs_n[None, :], mask=t_live[:, None] & n_live[None, :],
                               other=0.0).to(ACC)
                acc += tl.sum(v[:, None] * tile, axis=0)
    tl.store(gin_ptr + (c * H * W + pos) * N + offs_n, acc.to(gin_ptr.dtype.element_ty), mask=n_live)


@triton.jit
def _weight_grad_kernel(gout_ptr, in_ptr, row_ptr, col_ptr, out_ptr,
                        H, W, N, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    o = tl.load(row_ptr + k)
    j = tl.load(col_ptr + k).to(tl.int64)
    c = j // (KH * KW)
    r = j % (KH * KW)
    dy = (r // KW) * DH - PH
    dx = (r % KW) * DW - PW
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for p0 in range(0, OH * OW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        iy = (ps // OW) * SH + dy
        ix = (ps % OW) * SW + dx
        inside = (ps < OH * OW) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        g_rows = (o * OH * OW + ps) * N
        i_rows = ((c * H + iy) * W + ix) * N
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            live = inside[:, None] & (offs_n < N)[None, :]
            a = tl.load(gout_ptr + g_rows[:, None] + offs_n[None, :], mask=live, other=0.0).to(ACC)
            b = tl.load(in_ptr + i_rows[:, None] + offs_n[None, :], mask=live, other=0.0).to(ACC)
            acc += a * b
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(out_ptr + k, total.to(out_ptr.dtype.element_ty))


def _geometry_args(h, w, n, oh, ow, kernel_size, stride, padding, dilation):
    return (h, w, n, oh, ow, kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1])


def sparse_conv2d_triton(values, crow_indices, col_indices, input_t, kernel_size, stride, padding, dilation):
    """Triton fedspa::sparse_conv2d (same contract as the reference)."""
    out_h, out_w = check_conv_forward_inputs("sparse_conv2d", values, crow_indices, col_indices, input_t,
                                             kernel_size, stride, padding, dilation)
    check_device("sparse_conv2d", values.device)
    channels, height, width, batch = input_t.shape
    out_channels = crow_indices.numel() - 1
    out = torch.empty((out_channels, out_h, out_w, batch), dtype=input_t.dtype, device=input_t.device)
    if out.numel() == 0:
        return out
    grid = (out_channels, out_h * out_w, triton.cdiv(batch, _BLOCK_N))
    _forward_kernel[grid](values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(),
                          input_t.contiguous(), out,
                          *_geometry_args(height, width, batch, out_h, out_w, kernel_size, stride, padding, dilation),
                          ACC=accumulator(values.dtype), BLOCK_NZ=_BLOCK_NZ, BLOCK_N=_BLOCK_N)
    return out


def sparse_conv2d_input_grad_triton(values, crow_indices, col_indices, grad_out_t, input_chw, kernel_size, stride,
                                    padding, dilation):
    """Triton fedspa::sparse_conv2d_input_grad (same contract as the reference): the weight's transposed order is
    built for the call from the checked CSR pattern, then gathered column by column."""
    check_conv_input_grad_inputs("sparse_conv2d_input_grad", values, crow_indices, col_indices, grad_out_t, input_chw,
                                 kernel_size, stride, padding, dilation)
    check_device("sparse_conv2d_input_grad", values.device)
    _, out_h, out_w, batch = grad_out_t.shape
    channels, height, width = input_chw
    grad_input = torch.empty((channels, height, width, batch), dtype=grad_out_t.dtype, device=grad_out_t.device)
    if grad_input.numel() == 0:
        return grad_input
    t_crow, t_col, values_t = csr_transpose(values, crow_indices, col_indices,
                                            channels * kernel_size[0] * kernel_size[1])
    grid = (channels, height * width, triton.cdiv(batch, _BLOCK_N))
    _input_grad_kernel[grid](values_t.contiguous(), t_crow, t_col, grad_out_t.contiguous(), grad_input,
                             *_geometry_args(height, width, batch, out_h, out_w, kernel_size, stride, padding,
                                             dilation),
                             ACC=accumulator(values.dtype), BLOCK_NZ=_BLOCK_NZ, BLOCK_N=_BLOCK_N)
    return grad_input


def sparse_conv2d_weight_grad_triton(grad_out_t, input_t, crow_indices, col_indices, kernel_size, stride, padding,
                                     dilation):
    """Triton fedspa::sparse_conv2d_weight_grad (same contract as the reference)."""
    check_conv_weight_grad_inputs("sparse_conv2d_weight_grad", grad_out_t, input_t, crow_indices, col_indices,
                                  kernel_size, stride, padding, dilation)
    check_device("sparse_conv2d_weight_grad", input_t.device)
    _, height, width, batch = input_t.shape
    out_h, out_w = output_hw((height, width), kernel_size, stride, padding, dilation)
    out = torch.empty(col_indices.numel(), dtype=input_t.dtype, device=input_t.device)
    if out.numel() == 0:
        return out
    if batch == 0:
        return out.zero_()
    rows = row_of_each_nonzero(crow_indices)
    _weight_grad_kernel[(out.numel(),)](grad_out_t.contiguous(), input_t.contiguous(), rows,
                                        col_indices.contiguous(), out,
                                        *_geometry_args(height, width, batch, out_h, out_w, kernel_size, stride,
                                                        padding, dilation),
                                        ACC=accumulator(input_t.dtype), BLOCK_P=_BLOCK_P, BLOCK_N=_BLOCK_N)
    return out


def compile_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs) the launchers use, for compile_check."""
    geometry = {name: "i64" for name in ("H", "W", "N", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW")}
    flags = {"ACC": "constexpr"}
    specs = []
    for dtype, acc in (("*fp16", tl.float32), ("*bf16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)):
        forward = [{"values_ptr": dtype, "crow_ptr": "*i64", "col_ptr": col, "in_ptr": dtype,
                    "out_ptr": dtype, **geometry, **flags, "BLOCK_NZ": "constexpr", "BLOCK_N": "constexpr"}
                   for col in ("*i16", "*i32")]
        input_grad = {"values_ptr": dtype, "tcrow_ptr": "*i64", "tcol_ptr": "*i32",
                      "gout_ptr": dtype, "gin_ptr": dtype, **geometry, **flags, "BLOCK_NZ": "constexpr",
                      "BLOCK_N": "constexpr"}
        weight_grad = [{"gout_ptr": dtype, "in_ptr": dtype, "row_ptr": "*i64", "col_ptr": col,
                        "out_ptr": dtype, **geometry, **flags, "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"}
                       for col in ("*i16", "*i32")]
        common = {"ACC": acc, "BLOCK_N": _BLOCK_N}
        specs += [(_forward_kernel, signature, {**common, "BLOCK_NZ": _BLOCK_NZ}) for signature in forward]
        specs.append((_input_grad_kernel, input_grad, {**common, "BLOCK_NZ": _BLOCK_NZ}))
        specs += [(_weight_grad_kernel, signature, {**common, "BLOCK_P": _BLOCK_P}) for signature in weight_grad]
    return specs
