"""Input checks of every op: the one leaf module that the op front ends, the references and the Triton launchers
import (it imports only torch), so that no import circle can form. The C++/CUDA kernels make the same checks with
the same messages (csrc/include/fedspa/*.h).

A CSR pattern (``crow`` int64 of rows + 1, ``col`` int16 or int32 of nnz) is valid for a matrix with ``num_cols``
columns when ``crow[0] == 0``, crow never decreases, ``crow[rows] == nnz``, and within each row the columns strictly
increase and lie in ``[0, num_cols)``. Every kernel of every backend checks this itself before reading through the
indices.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1
COL_DTYPES = (torch.int16, torch.int32)  # CSR column indices: int16 wherever the columns fit, else int32


def col_dtype_for(num_cols: int) -> torch.dtype:
    """The column index dtype a pattern with `num_cols` columns is stored in: int16 (2 bytes per nonzero) up to
    32768 columns, int32 beyond (up to 2^31 - 1 columns; more is an error)."""
    if num_cols > INT32_MAX:
        raise ValueError(f"{num_cols} columns do not fit int32 column indices")
    return torch.int16 if num_cols <= 2**15 else torch.int32


# ------------------------------------------------------------------------------------------------------------------
# CSR patterns
# ------------------------------------------------------------------------------------------------------------------
def check_transpose_input(op: str, x) -> None:
    """A 2-D floating-point tensor (fedspa::transpose_copy's input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_csr_metadata(op: str, crow: torch.Tensor, col: torch.Tensor, device: torch.device) -> None:
    """dtypes, dims and devices of a CSR structure (cheap, no data read)."""
    if not isinstance(crow, torch.Tensor) or crow.dtype != torch.int64 or crow.dim() != 1 or crow.numel() < 1:
        raise TypeError(f"{op}: crow_indices must be a non-empty 1-D int64 tensor, got "
                        f"{_describe(crow)}")
    if not isinstance(col, torch.Tensor) or col.dtype not in COL_DTYPES or col.dim() != 1:
        raise TypeError(f"{op}: col_indices must be a 1-D int16 or int32 tensor, got {_describe(col)}")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the operands are on {device}")


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_csr(op: str, crow: torch.Tensor, col: torch.Tensor, num_cols: int) -> None:
    """Reads the structure (see the module docstring); raises ValueError naming the first offender."""
    nnz = col.numel()
    first, last = (int(v) for v in torch.stack([crow[0], crow[-1]]).tolist())
    if first != 0 or last != nnz:
        raise ValueError(f"{op}: crow_indices must start at 0 and end at nnz={nnz}, got {first} and {last}")
    drops = (crow[1:] < crow[:-1]).nonzero()
    if drops.numel():
        r = int(drops[0, 0])
        raise ValueError(f"{op}: crow_indices decreases at row {r}: {int(crow[r])} -> {int(crow[r + 1])}")
    if nnz == 0:
        return
    # a bound beyond col's range cannot be exceeded (and must not overflow the comparison)
    above = (col >= num_cols) if num_cols <= torch.iinfo(col.dtype).max else torch.zeros_like(col, dtype=torch.bool)
    bad = ((col < 0) | above).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise ValueError(f"{op}: col_indices[{k}] = {int(col[k])} is outside [0, {num_cols})")
    if nnz < 2:
        return
    starts = torch.zeros(nnz, dtype=torch.bool, device=col.device)
    begins = crow[:-1]
    starts[begins[begins < crow[1:]]] = True
    unsorted = ((col[1:] <= col[:-1]) & ~starts[1:]).nonzero()
    if unsorted.numel():
        k = int(unsorted[0, 0]) + 1
        r = int(torch.searchsorted(crow, torch.tensor([k], device=crow.device), right=True)[0]) - 1
        raise ValueError(f"{op}: column indices of row {r} are not strictly increasing at nonzero {k}: "
                         f"{int(col[k - 1])} then {int(col[k])}")


def row_of_each_nonzero(crow: torch.Tensor) -> torch.Tensor:
    """The row index (int64) of every nonzero, in CSR order."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def csr_transpose(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                  cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transposed (CSC) order of a checked CSR pattern with its values carried along: column pointers (int64,
    cols + 1), the row of each entry (int32) and the values, column by column with rows ascending (one stable sort:
    what the CUDA and Triton transposed products build per call, since no layer keeps a transposed copy)."""
    perm = torch.argsort(col, stable=True)  # CSR is row-major, so equal columns keep ascending rows
    ccol = torch.zeros(cols + 1, dtype=torch.int64, device=col.device)
    if col.numel():
        ccol[1:] = torch.cumsum(torch.bincount(col.long(), minlength=cols), dim=0)
    return ccol, row_of_each_nonzero(crow)[perm].to(torch.int32), values[perm]


def check_values(op: str, values: torch.Tensor, nnz: int, name: str = "values") -> None:
    if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES or values.dim() != 1:
        raise TypeError(f"{op}: {name} must be a 1-D floating tensor, got {_describe(values)}")
    if values.numel() != nnz:
        raise ValueError(f"{op}: {values.numel()} {name} for {nnz} nonzeros")


# ------------------------------------------------------------------------------------------------------------------
# SpMM and SDDMM
# ------------------------------------------------------------------------------------------------------------------
def check_spmm_inputs(op: str, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                      dense: torch.Tensor, cols: int | None = None) -> None:
    """fedspa::spmm: values (nnz,), a pattern of rows x dense.shape[0], dense (cols x N). With `cols`
    (fedspa::spmm_transposed): a pattern of (dense.shape[0] rows) x cols, dense (rows x N)."""
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise ValueError(f"{op}: dense must be 2-D ({'rows' if cols is not None else 'cols'} x N), got "
                         f"{_describe(dense)}")
    check_csr_metadata(op, crow, col, dense.device)
    check_values(op, values, col.numel())
    if dense.dtype != values.dtype:
        raise TypeError(f"{op}: dense is {dense.dtype} but values are {values.dtype}")
    if values.device != dense.device:
        raise ValueError(f"{op}: dense is on {dense.device} but values are on {values.device}")
    if cols is None:
        check_csr(op, crow, col, dense.shape[0])
        return
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise ValueError(f"{op}: cols must be an integer >= 0, got {cols!r}")
    if dense.shape[0] != crow.numel() - 1:
        raise ValueError(f"{op}: the pattern has {crow.numel() - 1} rows but dense has shape {tuple(dense.shape)}")
    check_csr(op, crow, col, cols)


def check_sddmm_inputs(op: str, a: torch.Tensor, bt: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> None:
    """fedspa::sddmm: a (rows x K), bt (cols x K), a pattern of rows x cols."""
    if not isinstance(a, torch.Tensor) or a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: a must be floating (fp16/bf16/fp32/fp64), got {_describe(a)}")
    if not isinstance(bt, torch.Tensor) or bt.dtype != a.dtype:
        raise TypeError(f"{op}: bt is {_describe(bt)} but a is {a.dtype}")
    if a.dim() != 2 or bt.dim() != 2 or a.shape[1] != bt.shape[1]:
        raise ValueError(f"{op}: a (rows x K) and bt (cols x K) must be 2-D with equal K, got {tuple(a.shape)} and "
                         f"{tuple(bt.shape)}")
    if bt.device != a.device:
        raise ValueError(f"{op}: bt is on {bt.device} but a is on {a.device}")
    check_csr_metadata(op, crow, col, a.device)
    if crow.numel() != a.shape[0] + 1:
        raise ValueError(f"{op}: crow_indices has {crow.numel()} entries but a has {a.shape[0]} rows")
    check_csr(op, crow, col, bt.shape[0])


# ------------------------------------------------------------------------------------------------------------------
# Sparse convolution
# ------------------------------------------------------------------------------------------------------------------
def output_hw(input_hw, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(input_hw, kernel_size, stride, padding, dilation))


def check_geometry(op: str, kernel_size, stride, padding, dilation) -> None:
    for name, value, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                             ("dilation", dilation, 1)):
        if len(value) != 2 or any(v < low for v in value):
            raise ValueError(f"{op}: {name} must be two integers >= {low}, got {list(value)}")


def check_activation(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (C, H, W, N), got {_describe(t)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but the weights are {dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the weights are on {device}")


def check_conv_forward_inputs(op, values, crow, col, input_t, kernel_size, stride, padding,
                              dilation) -> tuple[int, int]:
    """fedspa::sparse_conv2d; returns the output (H', W')."""
    check_geometry(op, kernel_size, stride, padding, dilation)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: values must be a tensor, got {type(values).__name__}")
    check_activation(op, "input_t", input_t, values.dtype, values.device)
    check_csr_metadata(op, crow, col, values.device)
    check_values(op, values, col.numel())
    out_h, out_w = output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{op}: input of {tuple(input_t.shape[1:3])} gives an empty output with kernel "
                         f"{list(kernel_size)}, stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}")
    check_csr(op, crow, col, input_t.shape[0] * kernel_size[0] * kernel_size[1])
    return out_h, out_w


def check_conv_input_grad_inputs(op, values, crow, col, grad_out_t, input_chw, kernel_size, stride, padding,
                                 dilation) -> None:
    """fedspa::sparse_conv2d_input_grad (the weight in its CSR order, the input's (C, H, W) given)."""
    check_geometry(op, kernel_size, stride, padding, dilation)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: values must be a tensor, got {type(values).__name__}")
    check_activation(op, "grad_out_t", grad_out_t, values.dtype, values.device)
    check_csr_metadata(op, crow, col, values.device)
    check_values(op, values, col.numel())
    if len(input_chw) != 3 or input_chw[0] < 0 or any(v < 1 for v in input_chw[1:]):
        raise ValueError(f"{op}: input_chw must be three integers (channels >= 0, height and width >= 1), got "
                         f"{list(input_chw)}")
    if crow.numel() - 1 != grad_out_t.shape[0]:
        raise ValueError(f"{op}: the pattern has {crow.numel() - 1} rows (output channels) but grad_out_t is "
                         f"{tuple(grad_out_t.shape)}")
    expected = output_hw(input_chw[1:], kernel_size, stride, padding, dilation)
    if tuple(grad_out_t.shape[1:3]) != tuple(expected):
        raise ValueError(f"{op}: grad_out_t is {tuple(grad_out_t.shape)} but an input of {list(input_chw[1:])} gives "
                         f"{tuple(expected)} outputs")
    check_csr(op, crow, col, input_chw[0] * kernel_size[0] * kernel_size[1])


def check_conv_weight_grad_inputs(op, grad_out_t, input_t, crow, col, kernel_size, stride, padding,
                                  dilation) -> None:
    """fedspa::sparse_conv2d_weight_grad."""
    check_geometry(op, kernel_size, stride, padding, dilation)
    if not isinstance(input_t, torch.Tensor) or input_t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: input_t must be floating, got {_describe(input_t)}")
    check_activation(op, "input_t", input_t, input_t.dtype, input_t.device)
    check_activation(op, "grad_out_t", grad_out_t, input_t.dtype, input_t.device)
    check_csr_metadata(op, crow, col, input_t.device)
    expected = (crow.numel() - 1, *output_hw(input_t.shape[1:3], kernel_size, stride, padding, dilation),
                input_t.shape[3])
    if tuple(grad_out_t.shape) != expected:
        raise ValueError(f"{op}: grad_out_t is {tuple(grad_out_t.shape)}, expected {expected}")
    check_csr(op, crow, col, input_t.shape[0] * kernel_size[0] * kernel_size[1])


# ------------------------------------------------------------------------------------------------------------------
# Prune/regrow
# ------------------------------------------------------------------------------------------------------------------
def check_drop_counts(op: str, drop_counts) -> list[int]:
    """Drop counts as Python ints: integers (or integral floats), never silently truncated."""
    values = drop_counts.tolist() if isinstance(drop_counts, torch.Tensor) else list(drop_counts)
    counts = []
    for l, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not float(k).is_integer():
            raise TypeError(f"{op}: layer {l} drop count must be an integer, got {k!r}")
        counts.append(int(k))
    return counts


def check_prune_regrow_inputs(op: str, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                              scores: Sequence[torch.Tensor], drop_counts: Sequence[int]) -> None:
    """Everything that can be checked without reading the data (before any allocation)."""
    if not (len(weights) == len(masks) == len(scores) == len(drop_counts)):
        raise ValueError(f"{op}: got {len(weights)} weights, {len(masks)} masks, {len(scores)} scores and "
                         f"{len(drop_counts)} drop counts; one of each per layer")
    device = weights[0].device if weights else None
    for l, (w, m, s, k) in enumerate(zip(weights, masks, scores, drop_counts)):
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: layer {l} weights must be floating, got {w.dtype}")
        if s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: layer {l} scores must be floating, got {s.dtype}")
        if m.dtype != torch.bool:
            raise TypeError(f"{op}: layer {l} mask must be bool, got {m.dtype}")
        if m.shape != w.shape or s.shape != w.shape:
            raise ValueError(f"{op}: layer {l} has weights {tuple(w.shape)}, mask {tuple(m.shape)} and scores "
                             f"{tuple(s.shape)}; they must have one shape")
        if w.device != device or m.device != device or s.device != device:
            raise ValueError(f"{op}: layer {l} has tensors on {w.device}, {m.device} and {s.device}; all must be on "
                             f"{device}")
        if k < 0:
            raise ValueError(f"{op}: layer {l} drop count must be >= 0, got {k}")
        if k > w.numel():
            raise ValueError(f"{op}: layer {l} drop count {k} exceeds its {w.numel()} positions")


def check_prune_regrow_counts(op: str, layer: int, k: int, active: int, inactive: int) -> None:
    if k > active:
        raise ValueError(f"{op}: layer {layer} drops {k} weights but has only {active} active")
    if k > inactive:
        raise ValueError(f"{op}: layer {layer} regrows {k} weights but has only {inactive} inactive positions")


# ------------------------------------------------------------------------------------------------------------------
# Scatter-add aggregation
# ------------------------------------------------------------------------------------------------------------------
def check_scatter_inputs(op: str, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         weights: torch.Tensor, n: int) -> None:
    """Raises TypeError/ValueError for anything wrong that can be seen without reading the data."""
    if n < 0:
        raise ValueError(f"{op}: n must be >= 0, got {n}")
    if len(indices) != len(values):
        raise ValueError(
            f"{op}: got {len(indices)} index tensors but {len(values)} value tensors (one of each per client)")
    if weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: weights must be float32 or float64 (the accumulation dtype), got {weights.dtype}")
    if weights.dim() != 1 or weights.numel() != len(indices):
        raise ValueError(f"{op}: weights must be a 1-D tensor with one entry per client ({len(indices)}), "
                         f"got shape {tuple(weights.shape)}")
    for c, (idx, val) in enumerate(zip(indices, values)):
        if idx.device != weights.device or val.device != weights.device:
            raise ValueError(f"{op}: client {c} has indices on {idx.device} and values on {val.device}, but weights "
                             f"are on {weights.device}; all tensors must be on one device")
        if idx.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: client {c} indices must be int32 or int64, got {idx.dtype}")
        if val.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: client {c} values must be float16, bfloat16, float32 or float64, got {val.dtype}")
        if idx.dtype != indices[0].dtype:
            raise TypeError(f"{op}: client {c} indices are {idx.dtype} but client 0's are {indices[0].dtype}; "
                            "use one index dtype for all clients")
        if val.dtype != values[0].dtype:
            raise TypeError(f"{op}: client {c} values are {val.dtype} but client 0's are {values[0].dtype}; "
                            "use one value dtype for all clients")
        if idx.dim() != 1 or val.dim() != 1:
            raise ValueError(f"{op}: client {c} indices and values must be 1-D, got shapes {tuple(idx.shape)} "
                             f"and {tuple(val.shape)}")
        if idx.numel() != val.numel():
            raise ValueError(f"{op}: client {c} has {idx.numel()} indices but {val.numel()} values")


def check_scatter_weights(op: str, weights: torch.Tensor) -> None:
    """Weights must be finite and >= 0."""
    for c, w in enumerate(weights.tolist()):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{op}: client {c} has weight {w:g}; weights must be finite and >= 0")


def check_scatter_previous(op: str, previous: torch.Tensor, weights: torch.Tensor) -> None:
    if previous.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: previous must be a floating tensor, got {previous.dtype}")
    if previous.device != weights.device:
        raise ValueError(f"{op}: previous is on {previous.device} but weights are on {weights.device}")


def out_of_range(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Where the indices fall outside [0, n) (an int32 index can never reach n >= 2^31)."""
    if n > torch.iinfo(idx.dtype).max:
        return idx < 0
    return (idx < 0) | (idx >= n)


def first_true(mask: torch.Tensor) -> int | None:
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def raise_first_invalid(op: str, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], n: int,
                        first_bad_index: Sequence[int | None], first_non_finite: Sequence[int | None]) -> None:
    """Raises for the lowest client with a bad index, else the lowest with a non-finite value."""
    for c, pos in enumerate(first_bad_index):
        if pos is not None:
            raise ValueError(f"{op}: client {c} has index {int(indices[c][pos])} at position {pos}, outside [0, {n})")
    for c, pos in enumerate(first_non_finite):
        if pos is not None:
            raise ValueError(f"{op}: client {c} has a non-finite value ({float(values[c][pos]):g}) at position {pos}")
