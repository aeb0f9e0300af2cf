"""FLOPs from nnz and measured peak step memory."""

from __future__ import annotations

import torch
from torch import nn

from fedspa.metrics import forward_flops, peak_step_memory, training_flops_per_sample
from fedspa.nn import sparsify


def test_flops_count_dense_weights_and_sparse_nonzeros():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    sample = torch.zeros(3, 2, 6, 6)
    dense = 2 * (4 * 2 * 9 * 36 + 5 * 144) * 3  # 2 x MACs x batch
    assert forward_flops(model, sample) == dense
    assert training_flops_per_sample(model, (2, 6, 6)) == 3 * dense // 3
    masks = {"0": torch.rand(4, 2, 3, 3) < 0.3, "3": torch.rand(5, 144) < 0.1}
    sparse = sparsify(model, masks)
    expected = 2 * (int(masks["0"].sum()) * 36 + int(masks["3"].sum())) * 3
    assert forward_flops(sparse, sample) == expected


def test_peak_step_memory_sees_the_step_allocations():
    size = 4_000_000  # bytes of one float32 buffer of 1M elements

    def step():
        a = torch.ones(1_000_000)
        b = a * 2  # two buffers alive together
        del a, b

    peak = peak_step_memory(step, persistent=123)
    assert 123 + 2 * size <= peak < 123 + 4 * size


def test_peak_step_memory_is_quiet_on_stderr(capfd):
    peak_step_memory(lambda: torch.ones(10), 0)
    assert "profiler" not in capfd.readouterr().err
