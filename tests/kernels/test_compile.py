"""torch.compile: models of SparseLinear and SparseConv2d layers trace as one graph (no breaks, no data-dependent
guards) and the compiled forward and backward equal eager."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch._dynamo
from torch import nn

import fedspa_kernels as fk
from fedspa.nn import sparsify


def _model() -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))
    masks = {"0": torch.rand(4, 1, 3, 3) < 0.5, "3": torch.rand(6, 4, 3, 3) < 0.3, "6": torch.rand(16, 96) < 0.2,
             "8": torch.rand(10, 16) < 0.5}
    return sparsify(dense, masks)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_sparse_cnn_is_one_graph():
    explanation = torch._dynamo.explain(_model())(torch.randn(3, 1, 8, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_the_functional_ops_are_one_graph():
    S = fk.SparseMatrix.from_dense(torch.randn(7, 9), torch.rand(7, 9) < 0.4)

    def f(x, a, b):
        return fk.sparse_linear(x, S).sum() + fk.sddmm(a, b, S).sum() + fk.spmm(S, x.t(), transpose=False).sum()

    explanation = torch._dynamo.explain(f)(torch.randn(4, 9), torch.randn(7, 3), torch.randn(3, 9))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_fullgraph_compile_equals_eager_forward_and_backward():
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(5, 1, 8, 8)
    began = time.perf_counter()
    out = compiled(x)
    out.sum().backward()
    seconds = time.perf_counter() - began
    expected = eager(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    again = torch.randn(5, 1, 8, 8)  # no recompilation for new data of the same shape
    torch.testing.assert_close(compiled(again), eager(again))
    print(f"compile + first training step: {seconds:.1f} s")
