"""FLOPs from nnz and measured peak step memory."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedspa.metrics import forward_flops, peak_step_memory, training_flops_per_sample
from fedspa.nn import sparsify


def test_flops_count_dense_weights_and_sparse_nonzeros():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    sample = torch.zeros(3, 2, 6, 6)
    dense = 2 * (4 * 2 * 9 * 36 + 5 * 144) * 3  # 2 x MACs x batch
    assert forward_flops(model, sample) == dense
    assert training_flops_per_sample(model, sample) == 3 * dense / 3
    masks = {"0": torch.rand(4, 2, 3, 3) < 0.3, "3": torch.rand(5, 144) < 0.1}
    sparse = sparsify(model, masks)
    expected = 2 * (int(masks["0"].sum()) * 36 + int(masks["3"].sum())) * 3
    assert forward_flops(sparse, sample) == expected
    with FlopCounterMode(display=False) as counter:  # the backward of a sparse layer is two more products
        sparse(sample.requires_grad_()).sum().backward()
    assert counter.get_total_flops() == 3 * expected


def test_flops_of_layers_without_a_sparse_kernel_and_of_integer_inputs():
    """Token ids go straight in; attention and embedding layers are counted as they run."""
    model = nn.Sequential(nn.Embedding(12, 8), nn.Flatten(), nn.Linear(5 * 8, 3))
    tokens = torch.randint(0, 12, (4, 5))
    assert forward_flops(model, tokens) == 2 * 5 * 8 * 3 * 4  # an embedding lookup does no multiply-adds
    attention = nn.MultiheadAttention(8, 2, batch_first=True)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 8)
    projections = 2 * (3 * 8 * 8 + 8 * 8) * 2 * 5  # in_proj and out_proj over 10 tokens
    products = 2 * 2 * (2 * 5 * 5 * 8)  # batch 2: q k^T and attention @ v, 5 x 5 per head, 8 features in all
    assert forward_flops(Attend(), x) == projections + products


def test_flop_counting_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = [b.clone() for b in model[1].buffers()]
    forward_flops(model, torch.randn(4, 1, 6, 6))
    assert all(torch.equal(a, b) for a, b in zip(before, model[1].buffers()))


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
