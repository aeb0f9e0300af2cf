"""Sparse layers whose parameters are only the active weights, on fedspa_kernels' sparse kernels.

``SparseLinear`` and ``SparseConv2d`` hold the active values as their parameter (so gradients and optimizer
state exist only for them) and the pattern as CSR buffers (2 bytes of index per active weight with int16 columns,
no transposed copy).
:func:`sparsify` turns the Linear/Conv2d layers of a model into sparse ones given masks; :func:`densify` turns them
back. Any other weight
(a depthwise conv, an Embedding, ``MultiheadAttention``'s packed ``in_proj_weight``) can be masked in the forward
with :func:`mask_in_forward` (dense weight times the mask, a ``torch.nn.utils.parametrize`` parametrization);
:func:`apply_masks` chooses between the two per weight.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fedspa_kernels as fk

_PATTERN_BUFFERS = ("crow_indices", "col_indices")


class _SparseWeight(nn.Module):
    """A sparse (rows x cols) weight: the `values` parameter plus the pattern buffers."""

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError("mask must be a 2-D bool tensor")
        pattern = fk.SparseMatrix.from_mask(mask, dtype=dtype or torch.get_default_dtype())
        self.weight_shape = pattern.shape
        self.values = nn.Parameter(pattern.values)
        self._set_pattern(pattern)

    def _set_pattern(self, pattern: fk.SparseMatrix) -> None:
        for name in _PATTERN_BUFFERS:
            self.register_buffer(name, getattr(pattern, name))

    def matrix(self) -> fk.SparseMatrix:
        """The weight as a SparseMatrix over this module's tensors (the kernels check the pattern they get)."""
        return fk.SparseMatrix(self.crow_indices, self.col_indices, self.values, self.weight_shape, validate=False)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def mask(self) -> torch.Tensor:
        """The pattern as a dense bool (rows x cols) tensor."""
        return self.matrix().mask()

    def dense(self) -> torch.Tensor:
        """The dense (rows x cols) weight, zeros off the pattern (for inspection; training never forms it)."""
        return self.matrix().to_dense()

    def set_mask(self, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Moves to a new pattern. Values are kept where old and new patterns overlap and start at zero where
        the new one grows, unless `values` (one per True entry, row-major) is given. With an unchanged nnz
        (FedSpa's case) the parameter is updated in place, so optimizers keep their reference to it."""
        if mask.shape != self.weight_shape:
            raise ValueError(f"set_mask: mask shape {tuple(mask.shape)} does not match the weight {self.weight_shape}")
        if mask.device != self.values.device:
            raise ValueError(f"set_mask: mask is on {mask.device} but the layer is on {self.values.device}")
        with torch.no_grad():
            if values is None:
                dense = self.dense()
                values = dense[mask]
            pattern = fk.SparseMatrix.from_mask(mask, values=values.to(self.values.dtype))
        if pattern.nnz == self.values.numel():
            with torch.no_grad():
                self.values.copy_(pattern.values)
        else:
            self.values = nn.Parameter(pattern.values)
        self._set_pattern(pattern)


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with a sparse W (out_features x in_features) of fixed pattern.

    Its parameters are ``values`` (the active weights) and ``bias``; no dense weight or dense weight gradient
    is ever formed. Built from a mask (fresh values drawn like ``nn.Linear``'s) or from an ``nn.Linear`` with
    :meth:`from_dense`.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if mask.shape != (out_features, in_features):
            raise ValueError(f"SparseLinear: mask shape {tuple(mask.shape)} is not (out_features, in_features) = "
                             f"({out_features}, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.weight = _SparseWeight(mask.to(device=device) if device is not None else mask, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=self.weight.values.device,
                                             dtype=self.weight.values.dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0  # nn.Linear's init, at the mask
        with torch.no_grad():
            self.weight.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor, *, backend: str | None = None) -> SparseLinear:
        """The sparse layer holding `linear`'s weights at `mask` (and its bias)."""
        layer = cls(linear.in_features, linear.out_features, mask.to(linear.weight.device), linear.bias is not None,
                    dtype=linear.weight.dtype, backend=backend)
        with torch.no_grad():
            layer.weight.values.copy_(linear.weight[mask.to(linear.weight.device)])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weights (zeros off the pattern)."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.weight.values.device, dtype=self.weight.values.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight.dense())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def mask(self) -> torch.Tensor:
        """The pattern, shaped like the dense weight (out_features, in_features)."""
        return self.weight.mask()

    def set_mask(self, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Moves to a new pattern (see ``_SparseWeight.set_mask``)."""
        self.weight.set_mask(mask, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fk.sparse_linear(x, self.weight.matrix(), self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.weight.nnz}, density={self.weight.nnz / total if total else 0:.4f}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class SparseConv2d(nn.Module):
    """A 2-D convolution (groups = 1, zero padding) with a sparse weight, on the direct sparse convolution.

    The weight (out_channels, in_channels, kh, kw) is stored flattened to (out_channels, in_channels*kh*kw)
    as a sparse matrix; :func:`fedspa_kernels.sparse_conv2d` convolves with its nonzeros directly (no im2col).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, mask: torch.Tensor, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"SparseConv2d takes integer padding, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.backend = backend
        shape = (out_channels, in_channels, *self.kernel_size)
        if tuple(mask.shape) != shape:
            raise ValueError(f"SparseConv2d: mask shape {tuple(mask.shape)} is not {shape}")
        flat = mask.reshape(out_channels, -1)
        self.weight = _SparseWeight(flat.to(device=device) if device is not None else flat, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=self.weight.values.device,
                                             dtype=self.weight.values.dtype)) if bias else None
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.fan_in) if self.fan_in else 0.0  # nn.Conv2d's init, at the mask
        with torch.no_grad():
            self.weight.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor, *, backend: str | None = None) -> SparseConv2d:
        """The sparse layer holding `conv`'s weights at `mask` (same geometry, and its bias)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, mask.to(conv.weight.device), conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    dtype=conv.weight.dtype, backend=backend)
        with torch.no_grad():
            layer.weight.values.copy_(conv.weight[mask.to(conv.weight.device)])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's weights (zeros off the pattern)."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, 1, self.bias is not None, device=self.weight.values.device,
                          dtype=self.weight.values.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight.dense().reshape(dense.weight.shape))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def mask(self) -> torch.Tensor:
        """The pattern, shaped like the dense weight (out_channels, in_channels, kh, kw)."""
        return self.weight.mask().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def set_mask(self, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Moves to a new pattern given in the dense weight's shape (see ``_SparseWeight.set_mask``)."""
        self.weight.set_mask(mask.reshape(self.out_channels, -1), values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return fk.sparse_conv2d(x, self.weight.matrix(), self.kernel_size, self.bias, self.stride, self.padding,
                                self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        total = self.out_channels * self.fan_in
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"nnz={self.weight.nnz}, density={self.weight.nnz / total if total else 0:.4f}")


SPARSE_LAYERS = (SparseLinear, SparseConv2d)


def batch_innermost(x: torch.Tensor) -> bool:
    """Is `x` (N, C, H, W) laid out as SparseConv2d's output is: (C, H, W, N) in memory, the batch fastest?"""
    return x.dim() == 4 and x.permute(1, 2, 3, 0).is_contiguous()


class _BatchInnermost(torch.autograd.Function):
    """(N, C, H, W) -> the same values with (C, H, W, N) memory; the gradient goes back to the input's layout
    (NCHW or channels-last) rather than staying a (C, H, W, N) view, which elementwise backward ops before the
    pool (ReLU's threshold_backward against its NCHW output) would read an order of magnitude slower. On the CPU,
    NCHW moves both ways through fedspa_kernels' tiled transpose (2.4x faster than torch's copy at 128 x 32 x 28 x
    28); elsewhere torch's copy does it."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return fk.batch_last(x).permute(3, 0, 1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, = inputs
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if ctx.channels_last:
            return grad.contiguous(memory_format=torch.channels_last)
        return fk.nchw_contiguous(grad)


class SparseLayoutMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same results, gradients and indices) that keeps the sparse convolutions' activation layout.

    SparseConv2d computes in (C, H, W, N) and, given an input in that layout, returns its output as an (N, C, H, W)
    view of that memory (an NCHW input gets NCHW); a plain max_pool2d would
    copy it back to NCHW (its kernel for that layout is a slow generic loop) and the next sparse layer would copy it
    again. Here the (C, H, W, N) memory is pooled as the channels-last (C, N, H, W) tensor it also is, with torch's
    vectorized channels-last kernel, so the output is again (C, H', W', N) in memory: ReLU keeps that layout,
    ``flatten`` is a view of it, and the next SparseConv2d or SparseLinear reads it without a copy. An input in
    another layout (e.g. a dense first convolution's NCHW output) is transposed into that layout first, which costs
    less than the generic kernel saves (measured: benchmarks/README.md), and its gradient is transposed back into
    the input's layout, so that the layers before the pool (a ReLU's backward) never mix two layouts in one op.
    Batch 1 takes the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[0] < 2:
            return super().forward(x)
        if not batch_innermost(x):
            x = _BatchInnermost.apply(x)
        out = F.max_pool2d(x.transpose(0, 1), self.kernel_size, self.stride, self.padding, self.dilation,
                           ceil_mode=self.ceil_mode, return_indices=self.return_indices)
        if self.return_indices:
            return out[0].transpose(0, 1), out[1].transpose(0, 1)
        return out.transpose(0, 1)


def keep_sparse_layout(model: nn.Module) -> int:
    """In place: every ``nn.MaxPool2d`` (exactly that class) of `model` becomes a :class:`SparseLayoutMaxPool2d`
    with the same settings. Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.MaxPool2d:
            new = SparseLayoutMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                                        module.return_indices, module.ceil_mode)
            _replace(model, name, new)
            replaced += 1
    return replaced


def sparsify(model: nn.Module, masks: Mapping[str, torch.Tensor], *, inplace: bool = False,
             backend: str | None = None) -> nn.Module:
    """Replaces the Linear/Conv2d layers named in `masks` (module name -> bool mask shaped like its weight)
    by SparseLinear/SparseConv2d holding the weights at the mask. Other layers stay dense.

    Raises:
        ValueError: a name that is not a Linear/Conv2d of the model, or a mask of the wrong shape.
    """
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    for name, mask in masks.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"sparsify: {name!r} is not a Linear or Conv2d layer of the model "
                             f"(got {type(layer).__name__ if layer is not None else 'nothing'})")
        if tuple(mask.shape) != tuple(layer.weight.shape):
            raise ValueError(f"sparsify: mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(layer.weight.shape)}")
        kind = SparseLinear if isinstance(layer, nn.Linear) else SparseConv2d
        _replace(target, name, kind.from_dense(layer, mask, backend=backend))
    return target


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replaces every SparseLinear/SparseConv2d by the equivalent dense layer (zeros off the pattern)."""
    target = model if inplace else copy.deepcopy(model)
    for name, layer in list(target.named_modules()):
        if isinstance(layer, SPARSE_LAYERS):
            _replace(target, name, layer.to_dense())
    return target


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of a model's sparse layers, shaped like the dense weights (module name -> bool tensor)."""
    return {name: layer.mask() for name, layer in model.named_modules() if isinstance(layer, SPARSE_LAYERS)}


def sparse_layer_for(module: nn.Module) -> type[nn.Module] | None:
    """The sparse layer that can run `module`'s weight, or None. Only exact ``nn.Linear`` and ``nn.Conv2d``
    qualify (a subclass may have its own forward, and e.g. ``MultiheadAttention`` reads its ``out_proj`` weight
    directly); a Conv2d needs groups = 1, zero padding and integer padding."""
    if type(module) is nn.Linear:
        return SparseLinear
    if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return SparseConv2d
    return None


def why_not_sparse(module: nn.Module, attr: str = "weight") -> str:
    """Why no sparse layer runs `module`'s parameter `attr` (for messages), e.g. ``"Conv2d, groups=16"``."""
    name = type(module).__name__
    if attr != "weight":
        return f"{name}.{attr}"
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            return f"{name}, groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"{name}, padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"{name}, padding={module.padding!r}"
    return name


class _MaskGradient(torch.autograd.Function):
    """The weight unchanged forward (it is kept zero off the mask), its gradient times the mask backward."""

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class WeightMask(nn.Module):
    """A parametrization: the weight restricted to a fixed bool mask. The stored weight is zero off the mask
    (``right_inverse`` zeroes it when the parametrization is registered and on every assignment) and its gradient is
    masked, so it stays zero through SGD with weight decay and momentum: the forward sees exactly ``w * mask``
    without computing the product."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("WeightMask: mask must be a bool tensor")
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskGradient.apply(weight, self.mask)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ValueError(f"{name!r} is not a parameter of {type(model).__name__}") from None
    return module, attr


def mask_in_forward(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """In place: each parameter named in `masks` (``"module.attr"`` -> bool mask of its shape) becomes its dense
    value times the mask (``WeightMask``); the stored value is zeroed off the mask, so SGD with weight decay and
    momentum keeps it zero there.

    Raises:
        ValueError: a name that is not a parameter of the model, or a mask of another shape.
    """
    for name, mask in masks.items():
        module, attr = _owner(model, name)
        weight = getattr(module, attr, None)
        if not isinstance(weight, nn.Parameter) or parametrize.is_parametrized(module, attr):
            raise ValueError(f"mask_in_forward: {name!r} is not an unparametrized parameter of the model")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask_in_forward: mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        # registering applies WeightMask.right_inverse to the stored weight in place: zero off the mask
        parametrize.register_parametrization(module, attr, WeightMask(mask))
    return model


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], *, sparse: bool = True,
                sparse_max_density: float = 1.0, sparse_names: Collection[str] | None = None,
                backend: str | None = None) -> dict[str, str]:
    """In place: runs every masked weight (parameter name -> bool mask) the cheapest correct way.

    A weight becomes ``"sparse"`` (its Linear/Conv2d replaced by SparseLinear/SparseConv2d) when `sparse` is set,
    a sparse layer exists for it (:func:`sparse_layer_for`) and either its name is in `sparse_names` (when given:
    e.g. the layers measured faster sparse, :mod:`fedspa.execution`) or, without `sparse_names`, its density is
    at most `sparse_max_density`; ``"dense"`` when its mask is all ones (nothing to mask); ``"masked"`` (dense
    weight times the mask in the forward) otherwise. When a convolution runs sparse, the model's max-pooling layers
    keep its activation layout (:func:`keep_sparse_layout`).

    Returns:
        Parameter name -> "sparse" | "dense" | "masked".
    """
    plan: dict[str, str] = {}
    layers: dict[str, torch.Tensor] = {}
    masked: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        module, attr = _owner(model, name)
        if bool(mask.all()):
            plan[name] = "dense"
        elif (sparse and attr == "weight" and sparse_layer_for(module) is not None
              and (name in sparse_names if sparse_names is not None
                   else int(mask.count_nonzero()) <= sparse_max_density * mask.numel())):
            plan[name] = "sparse"
            layers[name.rpartition(".")[0]] = mask
        else:
            plan[name] = "masked"
            masked[name] = mask
    sparsify(model, layers, inplace=True, backend=backend)
    mask_in_forward(model, masked)
    if any(isinstance(m, SparseConv2d) for m in model.modules()):
        keep_sparse_layout(model)
    return plan


def set_masked_weights(model: nn.Module, masks: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
                       moved: Collection[str] = ()) -> None:
    """In place, on a model prepared by :func:`apply_masks`: every weight named in `masks` takes `values[name]`
    (its entries at the mask, in the mask's row-major order: a sparse layer's CSR order), however it runs. Those named
    in `moved` first move to their new mask: a sparse layer rebuilds its pattern (O(weight size), what a new mask
    costs), a dense weight x mask swaps its mask. Nothing else is rebuilt: each weight keeps the way it runs.

    Raises:
        ValueError: a weight that runs unmasked (its mask was all ones) asked to move to a mask with zeros.
    """
    with torch.no_grad():
        for name, mask in masks.items():
            module, attr = _owner(model, name)
            value = values[name]
            if isinstance(module, SPARSE_LAYERS) and attr == "weight":
                if name in moved:
                    module.set_mask(mask, value)
                else:
                    module.weight.values.copy_(value)
            elif parametrize.is_parametrized(module, attr):
                parametrization = module.parametrizations[attr]
                if name in moved:
                    parametrization[0].mask.copy_(mask)
                original = parametrization.original
                flat = torch.zeros(original.numel(), dtype=original.dtype, device=original.device)
                flat[mask.reshape(-1)] = value.to(original.dtype)
                original.copy_(flat.reshape(original.shape))
            else:
                weight = getattr(module, attr)
                if name in moved and not bool(mask.all()):
                    raise ValueError(f"set_masked_weights: {name!r} runs unmasked; it cannot move to a mask with "
                                     "zeros (build the model again with apply_masks)")
                weight.copy_(value.reshape(weight.shape))


def dense_weight_gradients(model: nn.Module, names: Collection[str],
                           loss_of_model: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The gradient of ``loss_of_model()`` with respect to each named weight as if it were dense (at every position,
    the mask's zeros included), on a model as :func:`apply_masks` prepared it, without a dense copy of the model.

    Each named weight's layer (SparseLinear, SparseConv2d, or an ``nn.Linear`` / ``nn.Conv2d``, masked or not) has
    its input caught in the forward pass and its output gradient in one backward pass that computes no parameter
    gradient; its dense weight gradient is then formed from the two (``dy^T x`` for a linear layer,
    ``torch.nn.grad.conv2d_weight`` for a convolution), summed over the layer's calls.

    Returns:
        Weight name -> dense gradient (the weight's dense shape), or None when a named weight is not the weight of
        such a layer (e.g. an Embedding, or a convolution with string padding): the caller falls back to a dense copy.
    """
    layers = {}
    for name in names:
        module, attr = _owner(model, name)
        conv = isinstance(module, (SparseConv2d, nn.Conv2d))
        if attr != "weight" or not (conv or isinstance(module, (SparseLinear, nn.Linear))):
            return None
        if conv and (isinstance(module.padding, str) or getattr(module, "padding_mode", "zeros") != "zeros"):
            return None
        layers[name] = module
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    handles = [module.register_forward_hook(lambda _m, args, out, name=name: calls[name].append((args[0].detach(), out)))
               for name, module in layers.items()]
    try:
        loss = loss_of_model()
    finally:
        for handle in handles:
            handle.remove()
    order = [(name, x, out) for name in layers for x, out in calls[name]]
    grads = torch.autograd.grad(loss, [out for _, _, out in order], allow_unused=True) if order else ()
    result: dict[str, torch.Tensor] = {}
    for (name, x, _), dy in zip(order, grads):
        if dy is None:
            continue
        module = layers[name]
        if isinstance(module, (SparseConv2d, nn.Conv2d)):
            shape = (module.out_channels, module.in_channels // getattr(module, "groups", 1), *module.kernel_size)
            grad = torch.nn.grad.conv2d_weight(x, shape, dy, module.stride, module.padding, module.dilation,
                                               getattr(module, "groups", 1))
        else:
            grad = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        result[name] = result[name] + grad if name in result else grad
    for name, module in layers.items():  # a layer the loss never reached: a zero gradient
        if name not in result:
            shape = ((module.out_channels, module.in_channels // getattr(module, "groups", 1), *module.kernel_size)
                     if isinstance(module, (SparseConv2d, nn.Conv2d)) else (module.out_features, module.in_features))
            result[name] = torch.zeros(shape, dtype=loss.dtype, device=loss.device)
    return result


def masked_weight_values(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The current dense value (zeros off the mask) of each named weight, however it runs: a sparse layer's
    nonzeros scattered back, a masked weight's value times its mask, or the plain weight. Detached."""
    out = {}
    for name in names:
        module, attr = _owner(model, name)
        if isinstance(module, SPARSE_LAYERS) and attr == "weight":
            shape = ((module.out_features, module.in_features) if isinstance(module, SparseLinear)
                     else (module.out_channels, module.in_channels, *module.kernel_size))
            out[name] = module.weight.dense().detach().reshape(shape)
        else:
            out[name] = getattr(module, attr).detach()
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def training_memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held for training: parameters, their gradients, optimizer state, and buffers (sparse patterns).

    Counts the storage of the tensors that exist right now (call after a step for optimizer state).
    """
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = list(model.parameters())
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(size(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    result = {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer_state": state,
        "buffers": sum(size(b) for b in model.buffers()),
    }
    result["total"] = sum(result.values())
    return result
