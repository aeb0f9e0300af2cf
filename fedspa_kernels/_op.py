"""The op descriptor: one declaration per kernel op generates everything else.

``KernelOp(name, schema, reference, fake, triton="module:function", flops=...)`` defines
``fedspa::<name>`` with the pure-PyTorch reference as its default kernel (every device works), registers the fake
(torch.compile, meta tensors), defines the twins ``fedspa::<name>_reference`` (the reference on every device) and
``fedspa::<name>_triton`` (the Triton launcher, imported from its dotted path the first time it runs, so kernel
modules never import the op modules), all with the same schema and fake, and registers the FLOP formula for
``torch.utils.flop_counter``. The C++ CPU and CUDA kernels register themselves for ``fedspa::<name>``
(``TORCH_LIBRARY_IMPL``) when the extension loads. ``op.kernel(backend)`` is the one backend selector: the op that
runs on that backend (an op, never a bare function, so that tracing sees its fake).

``autograd_op(name, schema, forward, fake, backward, setup_context)`` defines a differentiable op over kernel ops
(``backend`` is one of its arguments, so the backward runs on the forward's backend).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import register_flop_formula

from ._backends import BACKENDS
from ._library import LIB, define


@dataclass
class KernelOp:
    """A kernel op and its backends (see the module docstring)."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    triton: str | None = None  # "package.module:function" of the Triton launcher
    flops: Callable | None = None  # torch.utils.flop_counter formula over argument shapes (and out_shape)
    _launcher: Callable | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        packets = []
        for name in (self.name, self.name + "_reference"):
            define(name, self.schema)
            LIB.impl(name, self.reference, "CompositeExplicitAutograd")
            torch.library.register_fake(f"fedspa::{name}", self.fake, lib=LIB)
            packets.append(getattr(torch.ops.fedspa, name))
        if self.triton is not None:
            define(self.name + "_triton", self.schema)
            for key in ("CPU", "CUDA"):
                LIB.impl(self.name + "_triton", self._run_triton, key)
            torch.library.register_fake(f"fedspa::{self.name}_triton", self.fake, lib=LIB)
            packets.append(getattr(torch.ops.fedspa, self.name + "_triton"))
        if self.flops is not None:
            for packet in packets:
                register_flop_formula(packet)(self.flops)

    def _run_triton(self, *args, **kwargs):
        if self._launcher is None:
            module, _, function = self.triton.partition(":")
            self._launcher = getattr(importlib.import_module(module), function)
        return self._launcher(*args, **kwargs)

    @property
    def op(self) -> torch._ops.OpOverloadPacket:
        """``torch.ops.fedspa.<name>``: the native kernel for the tensors' device where one is loaded, else the
        reference."""
        return getattr(torch.ops.fedspa, self.name)

    def kernel(self, backend: str) -> Callable:
        """The op that runs on `backend`."""
        if backend == "reference":
            return getattr(torch.ops.fedspa, self.name + "_reference")
        if backend in ("cpp", "cuda"):
            return self.op
        if backend == "triton":
            if self.triton is None:
                raise ValueError(f"fedspa::{self.name} has no Triton kernel")
            return getattr(torch.ops.fedspa, self.name + "_triton")
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def autograd_op(name: str, schema: str, forward: Callable, fake: Callable, backward: Callable,
                setup_context: Callable, flops: Callable | None = None) -> torch._ops.OpOverloadPacket:
    """Defines the differentiable op ``fedspa::<name>`` (a composite of kernel ops, with its fake, autograd and
    FLOP formula: a FlopCounterMode sees this op, not the kernel ops inside it)."""
    define(name, schema)
    LIB.impl(name, forward, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fedspa::{name}", fake, lib=LIB)
    torch.library.register_autograd(f"fedspa::{name}", backward, setup_context=setup_context, lib=LIB)
    packet = getattr(torch.ops.fedspa, name)
    if flops is not None:
        register_flop_formula(packet)(flops)
    return packet
