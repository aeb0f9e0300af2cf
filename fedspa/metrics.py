"""Costs that FedSpa claims to save, measured: training FLOPs (sparse ops by nnz), a client step's peak memory."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import fedspa_kernels  # noqa: F401  (registers the FLOP formulas of the sparse ops)

# torch's counter knows the CUDA attention kernels but not the CPU one
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


def flop_counter_mode() -> FlopCounterMode:
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also knows fedspa's sparse ops and CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)


def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass over `sample` (batch included), counted by
    ``torch.utils.flop_counter`` on the ops that really run: dense matmuls, convolutions and attention in full,
    fedspa's sparse ops by their stored nonzeros. `sample` is real input of any dtype (e.g. token ids).
    Runs without gradients and in the model's current mode; normalization statistics are left untouched."""
    saved = _running_statistics(model)
    try:
        with torch.no_grad(), flop_counter_mode() as counter:
            model(sample)
    finally:
        _restore(saved)
    return int(counter.get_total_flops())


def training_flops_per_sample(model: nn.Module, sample: torch.Tensor) -> float:
    """Forward + backward (input and weight gradients): 3x the forward FLOPs, per sample of the batch `sample`."""
    return 3.0 * forward_flops(model, sample) / max(1, len(sample))


def _running_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in m.buffers(recurse=False)]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def peak_step_memory(step: Callable[[], None], persistent: int, device: torch.device | str = "cpu") -> int:
    """The peak bytes held during `step`: `persistent` (weights, gradients, optimizer state, buffers) plus the peak
    of the allocations made while it ran: on the CPU from the profiler's allocation timeline, on CUDA from the
    caching allocator's peak counter."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return persistent + max(0, torch.cuda.max_memory_allocated(device) - before)
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
