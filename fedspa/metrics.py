"""Costs that FedSpa claims to save, measured: training FLOPs (from nnz), a client step's peak memory."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .nn import SparseConv2d, SparseLinear


def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Multiply-adds x 2 of one forward pass over `sample` (batch included) through the model's Linear/Conv2d
    layers, counting a sparse layer's stored nonzeros and a dense layer's every weight."""
    total = 0
    hooks = []

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, SparseLinear):
            total += 2 * module.weight.nnz * (output.numel() // module.out_features)
        elif isinstance(module, SparseConv2d):
            total += 2 * module.weight.nnz * (output.numel() // module.out_channels)
        elif isinstance(module, nn.Linear):
            total += 2 * module.weight.numel() * (output.numel() // module.out_features)
        elif isinstance(module, nn.Conv2d):
            total += 2 * module.weight.numel() * (output.numel() // module.out_channels)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)):
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    return total


def training_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward + backward (input and weight gradients): 3x the forward FLOPs of one sample."""
    return 3 * forward_flops(model, torch.zeros(1, *input_shape))


def peak_step_memory(step: Callable[[], None], persistent: int) -> int:
    """The peak bytes held during `step`: `persistent` (weights, gradients, optimizer state, buffers) plus the peak
    of the allocations made while it ran, from the profiler's allocation timeline (CPU allocator)."""
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # an op's own allocations (children excluded) and the free-standing "[memory]" events (mostly frees)
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start, delta))
    running = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        running += delta
        peak = max(peak, running)
    return persistent + peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null meanwhile: the profiler's native layer (kineto) logs every start and
    stop there, and no environment variable turns that off. Python exceptions still propagate."""
    fd = 2  # the process's stderr, whatever sys.stderr is now (pytest, for one, replaces it)
    try:
        os.fstat(fd)
    except OSError:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
