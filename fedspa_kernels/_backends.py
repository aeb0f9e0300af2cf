"""Backend selection: which implementation of an op runs.

- ``"reference"``: the pure-PyTorch reference (any device; the test oracle).
- ``"cpp"``: the C++ CPU kernel from the native extension (CPU tensors).
- ``"cuda"``: the CUDA kernel from the native extension (CUDA tensors).
- ``"triton"``: the Triton kernel (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

``backend=None`` (or no :func:`use_backend` context) picks the fastest available for the tensors' device:
cpp on CPU, cuda then triton on CUDA, the reference otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import _extension

BACKENDS: tuple[str, ...] = ("reference", "cpp", "cuda", "triton")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedspa_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here (not built, no device, wrong device)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fedspa::{op}", dispatch_key))


def cpp_built(op: str | None = None) -> bool:
    """The C++ CPU kernels are loaded (for `op`, if given)."""
    if not _extension.STATE.loaded:
        return False
    return _has_kernel(op, "CPU") if op else True


def cuda_built(op: str | None = None) -> bool:
    """The extension was compiled with CUDA kernels (whether or not a GPU is present)."""
    if not _extension.STATE.loaded:
        return False
    return _has_kernel(op or "scatter_add_aggregate", "CUDA")


def available_backends(op: str | None = None) -> dict[str, bool]:
    """Which backends can run on this machine (for one op, if named).

    Returns:
        e.g. ``{"reference": True, "cpp": True, "cuda": False, "triton": True}``.
    """
    return {
        "reference": True,
        "cpp": cpp_built(op),
        "cuda": cuda_built(op) and torch.cuda.is_available(),
        "triton": triton_installed() and (torch.cuda.is_available() or triton_interpreted()),
    }


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops called with ``backend=None`` use `name` (None restores automatic choice)."""
    token = _forced.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def _unavailable_reason(name: str, device: torch.device, op: str) -> str | None:
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        if not cpp_built(op):
            return f"the native extension is not loaded ({_extension.STATE.error})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        if not cuda_built(op):
            reason = _extension.STATE.error or "the extension was built without CUDA kernels"
            return f"no CUDA kernel for fedspa::{op} ({reason})"
        return None
    if not triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if triton_interpreted() else "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    return f"the triton backend does not run on {device}"


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that runs `op` on `device`: the explicit one (checked), the forced one, or the best.
    (A constant under torch.compile: the choice is made once, when the graph is traced.)"""
    name = backend if backend is not None else _forced.get()
    if name is not None:
        _check_name(name)
        reason = _unavailable_reason(name, device, op)
        if reason is not None:
            raise BackendUnavailableError(f"fedspa::{op}: backend {name!r} is unavailable: {reason}")
        return name
    if device.type == "cpu":
        return "cpp" if cpp_built(op) else "reference"
    if device.type == "cuda":
        if cuda_built(op):
            return "cuda"
        if triton_installed():
            return "triton"
    return "reference"
