"""Sparse scatter-add aggregation: the server side of FedSpa.

C clients each send a sparse update: flat int positions into a parameter vector of length n and the float
values there. With per-client weights w_c:

    sum[i]      = sum over clients c, entries k of c with idx_c[k] == i, of  w_c * val_c[k]
    coverage[i] = the number of such entries ("count") or the sum of their w_c ("weight")
    average[i]  = sum[i] / coverage_weight[i] where that is > 0, else previous[i]   (scatter_add_average)

Duplicate positions within a client add up (as index_add_ does), and count once per entry.

Ops (namespace ``fedspa``; one schema each, shared by the triton twin):
    scatter_add_aggregate(Tensor[] indices, Tensor[] values, Tensor weights, SymInt n,
                          bool weighted_coverage=False) -> (Tensor sum, Tensor coverage)
    scatter_add_average(Tensor[] indices, Tensor[] values, Tensor weights, Tensor previous) -> Tensor

`weights` is a 1-D tensor (one entry per client) on the values' device whose dtype is the accumulation and
output dtype (float32, or float64). Kernels: the reference below (default), C++ CPU and CUDA
(csrc/*/scatter_add_aggregate.*), Triton (fedspa_kernels/triton_kernels/scatter_add_aggregate.py); every one
checks every index and value before any result is returned.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Literal

import torch

from .._backends import resolve_backend
from .._checks import (INDEX_DTYPES, check_scatter_inputs, check_scatter_previous, check_scatter_weights, first_true,
                       out_of_range, raise_first_invalid)
from .._op import KernelOp

AGGREGATE = "scatter_add_aggregate"
AVERAGE = "scatter_add_average"


# --------------------------------------------------------------------------------------------------------------
# Reference (the default kernel and the test oracle)
# --------------------------------------------------------------------------------------------------------------
def _reference(op: str, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], weights: torch.Tensor,
               n: int, weighted_coverage: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_scatter_inputs(op, indices, values, weights, n)
    check_scatter_weights(op, weights)
    raise_first_invalid(
        op, indices, values, n,
        [first_true(out_of_range(idx, n)) for idx in indices],
        [first_true(~torch.isfinite(val)) for val in values],
    )
    total = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    coverage = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    one = torch.ones((), dtype=weights.dtype, device=weights.device)
    for c, (idx, val) in enumerate(zip(indices, values)):
        idx64 = idx.long()
        total.index_add_(0, idx64, val.to(weights.dtype) * weights[c])
        per_entry = weights[c] if weighted_coverage else one
        coverage.index_add_(0, idx64, per_entry.expand(idx.numel()).contiguous())
    return total, coverage


def scatter_add_aggregate_reference(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                                    weights: torch.Tensor, n: int,
                                    weighted_coverage: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch fedspa::scatter_add_aggregate: index_add_ one client at a time."""
    return _reference(AGGREGATE, indices, values, weights, n, weighted_coverage)


def scatter_add_average_reference(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                                  weights: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch fedspa::scatter_add_average: weighted mean over the holders, `previous` elsewhere."""
    check_scatter_previous(AVERAGE, previous, weights)
    total, coverage = _reference(AVERAGE, indices, values, weights, previous.numel(), True)
    average = torch.where(coverage > 0, total / coverage, previous.reshape(-1).to(weights.dtype))
    return average.to(previous.dtype).reshape(previous.shape)


def _aggregate_fake(indices, values, weights, n, weighted_coverage=False):
    torch._check(len(indices) == len(values), lambda: f"{len(indices)} index tensors but {len(values)} value tensors")
    torch._check(weights.dim() == 1 and weights.shape[0] == len(indices),
                 lambda: f"weights must have one entry per client, got shape {tuple(weights.shape)}")
    for idx, val in zip(indices, values):
        torch._check(idx.dim() == 1 and val.dim() == 1 and idx.shape[0] == val.shape[0],
                     lambda: "indices and values must be 1-D of equal length")
    return weights.new_empty(n), weights.new_empty(n)


def _average_fake(indices, values, weights, previous):
    _aggregate_fake(indices, values, weights, previous.numel())
    return torch.empty_like(previous, memory_format=torch.contiguous_format)


SCATTER_ADD_AGGREGATE = KernelOp(
    AGGREGATE,
    "(Tensor[] indices, Tensor[] values, Tensor weights, SymInt n, bool weighted_coverage=False) -> (Tensor, Tensor)",
    reference=scatter_add_aggregate_reference, fake=_aggregate_fake,
    triton="fedspa_kernels.triton_kernels.scatter_add_aggregate:scatter_add_aggregate_triton")
SCATTER_ADD_AVERAGE = KernelOp(
    AVERAGE, "(Tensor[] indices, Tensor[] values, Tensor weights, Tensor previous) -> Tensor",
    reference=scatter_add_average_reference, fake=_average_fake,
    triton="fedspa_kernels.triton_kernels.scatter_add_aggregate:scatter_add_average_triton")


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
TensorList = Sequence[torch.Tensor] | torch.Tensor


def _client_list(name: str, tensors: TensorList) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        if tensors.dim() != 2:
            raise TypeError(f"{name} must be a sequence of tensors (one per client) or a 2-D tensor with one row "
                            f"per client, got a tensor of shape {tuple(tensors.shape)}")
        return list(tensors.unbind(0))
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a sequence of tensors (one per client), got {type(tensors).__name__}")
    for c, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{c}] must be a torch.Tensor, got {type(t).__name__}")
    return list(tensors)


def _weights_tensor(op: str, weights, num_clients: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if weights is None:
        return torch.ones(num_clients, dtype=dtype, device=device)
    if isinstance(weights, torch.Tensor):
        if weights.device != device:
            raise ValueError(f"{op}: weights are on {weights.device} but the updates are on {device}")
        if not (weights.is_floating_point() or weights.dtype in INDEX_DTYPES):
            raise TypeError(f"{op}: weights must be a real tensor, got {weights.dtype}")
        return weights.detach().to(dtype).reshape(-1) if weights.dim() <= 1 else weights.to(dtype)
    try:
        return torch.tensor([float(w) for w in weights], dtype=dtype, device=device)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: weights must be a sequence of numbers or a 1-D tensor, got {weights!r}") from None


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _prepare(op: str, indices: TensorList, values: TensorList, n: int, weights,
             extra_dtypes: tuple[torch.dtype, ...], device: torch.device | str | None):
    idx_list = _client_list("indices", indices)
    val_list = _client_list("values", values)
    if val_list:
        device = val_list[0].device
    elif isinstance(weights, torch.Tensor):
        device = weights.device
    device = torch.device(device if device is not None else "cpu")
    acc = _accumulation_dtype(*(v.dtype for v in val_list[:1]), *extra_dtypes,
                              *((weights.dtype,) if isinstance(weights, torch.Tensor) else ()))
    w = _weights_tensor(op, weights, len(idx_list), acc, device)
    check_scatter_inputs(op, idx_list, val_list, w, n)
    return idx_list, val_list, w, device


def scatter_add_aggregate(
    indices: TensorList,
    values: TensorList,
    n: int,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    coverage: Literal["count", "weight"] = "count",
    backend: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of C clients' sparse updates and the per-position coverage, in one pass.

    Args:
        indices: per-client 1-D int32/int64 tensors of flat positions in [0, n): a sequence of tensors, or a
            2-D tensor with one row per client. Duplicates within a client add up.
        values: per-client 1-D float tensors (float16/bfloat16/float32/float64), the same lengths.
        n: length of the dense parameter vector.
        weights: per-client finite, non-negative weights (sequence or 1-D tensor); None means 1 each.
        coverage: ``"count"``: entries per position; ``"weight"``: the summed weight of those entries.
        backend: None (best available), ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.
        device: where the outputs live when there are no clients (default CPU).

    Returns:
        ``(sum, coverage)``: dense length-n tensors, float64 if the values are float64, else float32.

    Raises:
        ValueError: an index outside [0, n), a non-finite value (naming the client and position),
            mismatched lengths, tensors on different devices, a negative or non-finite weight.
        TypeError: wrong dtypes.
    """
    if coverage not in ("count", "weight"):
        raise ValueError(f"{AGGREGATE}: coverage must be 'count' or 'weight', got {coverage!r}")
    if isinstance(n, bool):
        raise TypeError(f"{AGGREGATE}: n must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{AGGREGATE}: n must be an int, got {type(n).__name__}") from None
    idx_list, val_list, w, dev = _prepare(AGGREGATE, indices, values, n, weights, (), device)
    weighted = coverage == "weight"
    chosen = resolve_backend(backend, dev, AGGREGATE)
    return SCATTER_ADD_AGGREGATE.kernel(chosen)(idx_list, val_list, w, n, weighted)


def scatter_add_average(
    indices: TensorList,
    values: TensorList,
    previous: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked weighted average of sparse client values: the new global parameters of FedSpa's server.

    ``out[i] = sum_c w_c * val_c[i] / sum_c w_c`` over the clients holding position i, and
    ``out[i] = previous[i]`` where no client holds it. Positions index ``previous`` flattened.

    Args:
        indices, values, weights, backend: as in :func:`scatter_add_aggregate`.
        previous: the current parameters (any shape, floating); its numel is n.

    Returns:
        A new tensor shaped and typed like `previous`.
    """
    if not isinstance(previous, torch.Tensor):
        raise TypeError(f"{AVERAGE}: previous must be a torch.Tensor, got {type(previous).__name__}")
    idx_list, val_list, w, dev = _prepare(AVERAGE, indices, values, previous.numel(), weights, (previous.dtype,),
                                          previous.device)
    check_scatter_previous(AVERAGE, previous, w)
    if dev != previous.device:
        raise ValueError(f"{AVERAGE}: previous is on {previous.device} but the updates are on {dev}")
    chosen = resolve_backend(backend, dev, AVERAGE)
    return SCATTER_ADD_AVERAGE.kernel(chosen)(idx_list, val_list, w, previous).reshape(previous.shape)
