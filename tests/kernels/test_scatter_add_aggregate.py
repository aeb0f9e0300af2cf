"""fedspa::scatter_add_aggregate / scatter_add_average: every backend against the reference and by hand."""

from __future__ import annotations

import pytest
import torch

import fedspa_kernels as fk
from tests.helpers import backend_device_params, poison_allocator

AGG = backend_device_params("scatter_add_aggregate")
AVG = backend_device_params("scatter_add_average")


def _updates(n: int, lengths: list[int], *, sorted_: bool, unique: bool, index_dtype=torch.int64,
             value_dtype=torch.float32, device="cpu"):
    indices, values = [], []
    for length in lengths:
        if unique:
            length = min(length, n)
            idx = torch.randperm(n)[:length]
        else:
            idx = torch.randint(0, max(n, 1), (length,)) if n else torch.zeros(0, dtype=torch.int64)
        if sorted_:
            idx = idx.sort().values
        indices.append(idx.to(index_dtype).to(device))
        values.append((torch.randn(idx.numel()) * 3).to(value_dtype).to(device))
    return indices, values


def _reference(indices, values, n, weights, coverage):
    return fk.scatter_add_aggregate(indices, values, n, weights, coverage=coverage, backend="reference")


def _tolerances(value_dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if value_dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------------------------------------------
# semantics, worked by hand
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", AGG)
def test_hand_worked_example(backend, device):
    indices = [torch.tensor([0, 2, 2], device=device), torch.tensor([2, 4], device=device)]
    values = [torch.tensor([1.0, 2.0, 3.0], device=device), torch.tensor([10.0, 20.0], device=device)]
    weights = [1.0, 0.5]
    total, count = fk.scatter_add_aggregate(indices, values, 5, weights, backend=backend)
    assert total.tolist() == [1.0, 0.0, 10.0, 0.0, 10.0]  # 2 + 3 + 0.5 * 10 at position 2
    assert count.tolist() == [1.0, 0.0, 3.0, 0.0, 1.0]  # duplicates count once per entry
    _, weight = fk.scatter_add_aggregate(indices, values, 5, weights, coverage="weight", backend=backend)
    assert weight.tolist() == [1.0, 0.0, 2.5, 0.0, 0.5]


@pytest.mark.parametrize("backend,device", AVG)
def test_hand_worked_average(backend, device):
    indices = [torch.tensor([0, 2, 2], device=device), torch.tensor([2, 4], device=device)]
    values = [torch.tensor([1.0, 2.0, 3.0], device=device), torch.tensor([10.0, 20.0], device=device)]
    previous = torch.tensor([7.0, 8.0, 9.0, 10.0, 11.0], device=device)
    out = fk.scatter_add_average(indices, values, previous, [1.0, 0.5], backend=backend)
    assert out.tolist() == [1.0, 8.0, 4.0, 10.0, 20.0]  # (2 + 3 + 5) / 2.5 = 4; unheld keep previous
    zero_weight = fk.scatter_add_average(indices, values, previous, [0.0, 1.0], backend=backend)
    assert zero_weight.tolist() == [7.0, 8.0, 10.0, 10.0, 20.0]  # a weight-0 client holds nothing


# --------------------------------------------------------------------------------------------------------------
# against the reference
# --------------------------------------------------------------------------------------------------------------
CASES = [
    # (n, lengths per client, sorted, unique)
    pytest.param(10, [], True, True, id="no-clients"),
    pytest.param(7, [0, 0], True, True, id="empty-updates"),
    pytest.param(1, [1], True, True, id="n1"),
    pytest.param(37, [53, 0, 20], False, False, id="duplicates-37"),
    pytest.param(1000, [500, 999, 1], True, True, id="sorted-1000"),
    pytest.param(1000, [700, 700], False, False, id="random-dups-1000"),
    pytest.param(131_073, [65_000, 1, 131_073], True, True, id="tile-edge-131073"),
    pytest.param(300_001, [150_000, 90_000, 0, 200_000], True, True, id="sorted-300001"),
    pytest.param(300_001, [150_000, 90_000, 200_000], False, True, id="shuffled-300001"),
    pytest.param(300_001, [250_000, 250_000], True, False, id="sorted-dups-300001"),
]


@pytest.mark.parametrize("coverage", ["count", "weight"])
@pytest.mark.parametrize("n,lengths,sorted_,unique", CASES)
@pytest.mark.parametrize("backend,device", AGG)
def test_aggregate_matches_reference(backend, device, n, lengths, sorted_, unique, coverage):
    indices, values = _updates(n, lengths, sorted_=sorted_, unique=unique, device=device)
    weights = torch.rand(len(lengths)) * 2
    ref_sum, ref_cov = _reference(indices, values, n, weights, coverage)
    poison_allocator(n, torch.float32, device)
    got_sum, got_cov = fk.scatter_add_aggregate(indices, values, n, weights.to(device), coverage=coverage,
                                                backend=backend)
    assert got_sum.dtype == torch.float32 and got_sum.shape == (n,) and got_sum.device.type == device
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cov, ref_cov, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "index_dtype,value_dtype",
    [
        (torch.int32, torch.float32),
        (torch.int64, torch.float64),
        (torch.int32, torch.float64),
        (torch.int64, torch.float16),
        (torch.int32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("backend,device", AGG)
def test_aggregate_dtypes(backend, device, index_dtype, value_dtype, sorted_):
    if backend == "triton" and device == "cpu" and value_dtype == torch.bfloat16:
        pytest.skip("bf16 is wrong under the Triton interpreter")
    n = 140_000
    indices, values = _updates(n, [n // 2, n // 3, n], sorted_=sorted_, unique=True, index_dtype=index_dtype,
                               value_dtype=value_dtype, device=device)
    weights = [0.3, 1.7, 1.0]
    acc = torch.float64 if value_dtype == torch.float64 else torch.float32
    ref_sum, ref_cov = _reference(indices, values, n, weights, "weight")
    got_sum, got_cov = fk.scatter_add_aggregate(indices, values, n, weights, coverage="weight", backend=backend)
    assert got_sum.dtype == acc and got_cov.dtype == acc
    torch.testing.assert_close(got_sum, ref_sum, **_tolerances(value_dtype))
    torch.testing.assert_close(got_cov, ref_cov, **_tolerances(value_dtype))


@pytest.mark.parametrize("backend,device", AGG)
def test_aggregate_noncontiguous_and_2d_inputs(backend, device):
    n = 3000
    base = torch.randperm(n)[:2400].sort().values.reshape(2, 1200)
    strided_idx = [base[0, ::2], base[1, ::3]]  # views with stride 2 and 3
    vals = torch.randn(2, 1200, device=device)
    strided_val = [vals[0, ::2], vals[1, ::3]]
    strided_idx = [i.to(device) for i in strided_idx]
    assert not strided_idx[0].is_contiguous()
    got = fk.scatter_add_aggregate(strided_idx, strided_val, n, backend=backend)
    ref = _reference([i.contiguous() for i in strided_idx], [v.contiguous() for v in strided_val], n, None, "count")
    torch.testing.assert_close(got, ref)
    # a 2-D tensor is one client per row
    got2 = fk.scatter_add_aggregate(base.to(device), vals, n, backend=backend)
    ref2 = _reference(list(base.to(device)), list(vals), n, None, "count")
    torch.testing.assert_close(got2, ref2)


@pytest.mark.parametrize("prev_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n,lengths,sorted_,unique", [c for c in CASES if c.id in ("no-clients", "duplicates-37",
                                                                                   "sorted-1000", "sorted-300001",
                                                                                   "shuffled-300001")])
@pytest.mark.parametrize("backend,device", AVG)
def test_average_matches_reference(backend, device, n, lengths, sorted_, unique, prev_dtype):
    indices, values = _updates(n, lengths, sorted_=sorted_, unique=unique, device=device)
    weights = torch.rand(len(lengths)) + 0.1
    previous = torch.randn(n, device=device).to(prev_dtype)
    ref = fk.scatter_add_average(indices, values, previous, weights, backend="reference")
    poison_allocator(n, prev_dtype, device)
    got = fk.scatter_add_average(indices, values, previous, weights, backend=backend)
    assert got.dtype == prev_dtype and got.shape == previous.shape
    tol = {"rtol": 2e-3, "atol": 2e-3} if prev_dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, ref, **tol)
    held = torch.zeros(n, dtype=torch.bool, device=device)
    for idx in indices:
        held[idx.long()] = True
    assert torch.equal(got[~held], previous[~held])  # unheld positions are bit-identical to previous


@pytest.mark.parametrize("backend,device", AVG)
def test_average_keeps_shape_of_noncontiguous_previous(backend, device):
    previous = torch.randn(20, 30, device=device).t()  # (30, 20), not contiguous
    indices = [torch.tensor([0, 5, 599], device=device)]
    values = [torch.tensor([1.0, 2.0, 3.0], device=device)]
    got = fk.scatter_add_average(indices, values, previous, backend=backend)
    expected = previous.reshape(-1).clone()
    expected[[0, 5, 599]] = torch.tensor([1.0, 2.0, 3.0], device=device)
    assert got.shape == (30, 20)
    torch.testing.assert_close(got.reshape(-1), expected)


def test_cpp_results_do_not_depend_on_thread_count():
    if not fk.available_backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    n = 400_000
    indices, values = _updates(n, [300_000, 200_000, 350_000], sorted_=False, unique=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fk.scatter_add_aggregate(indices, values, n, backend="cpp")
        torch.set_num_threads(max(2, before))
        many = fk.scatter_add_aggregate(indices, values, n, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_cpp_equals_reference_bitwise_for_fp32():
    """Both CPU paths add a position's contributions in the reference's order (client, then entry)."""
    if not fk.available_backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    n = 300_001
    for sorted_ in (True, False):
        indices, values = _updates(n, [200_000, 150_000, 280_000], sorted_=sorted_, unique=False,
                                   index_dtype=torch.int32)
        got = fk.scatter_add_aggregate(indices, values, n, [0.7, 1.3, 0.9], backend="cpp")
        ref = _reference(indices, values, n, [0.7, 1.3, 0.9], "count")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_cpp_sorted_except_one_entry_falls_back_correctly():
    if not fk.available_backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    n = 500_000
    idx = torch.randperm(n)[:300_000].sort().values.to(torch.int32)
    idx[[1000, 250_000]] = idx[[250_000, 1000]]  # one far swap: every tile but two looks sorted
    values = [torch.randn(idx.numel())]
    got = fk.scatter_add_aggregate([idx], values, n, backend="cpp")
    ref = _reference([idx], values, n, None, "count")
    torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------------------------------------------
# bad input: a clear error, outputs never returned
# --------------------------------------------------------------------------------------------------------------
def _good(device, n=100):
    return [torch.tensor([1, 5, 9], device=device), torch.tensor([2, 50], device=device)], [
        torch.ones(3, device=device),
        torch.ones(2, device=device),
    ]


@pytest.mark.parametrize("bad_index", [-1, 100, 2**40])
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("backend,device", AGG)
def test_out_of_range_index_names_client_and_position(backend, device, bad_index, sorted_):
    n = 100
    good = torch.arange(0, 80, 2, device=device)
    bad = torch.arange(10, 50, device=device)
    position = 0 if bad_index < 0 else bad.numel() - 1  # keep it sorted when the others are
    bad[position] = bad_index
    if not sorted_:
        perm = torch.randperm(bad.numel(), device=device)
        bad = bad[perm]
        position = int((perm == (0 if bad_index < 0 else 39)).nonzero())
    values = [torch.randn(good.numel(), device=device), torch.randn(bad.numel(), device=device)]
    with pytest.raises(ValueError, match=rf"client 1 has index {bad_index} at position {position}, outside \[0, 100\)"):
        fk.scatter_add_aggregate([good, bad], values, n, backend=backend)
    with pytest.raises(ValueError, match=r"client 1 has index"):
        fk.scatter_add_average([good, bad], values, torch.zeros(n, device=device), backend=backend)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend,device", AGG)
def test_non_finite_value_names_client(backend, device, bad_value):
    indices, values = _good(device)
    values[1] = torch.tensor([1.0, bad_value], device=device)
    with pytest.raises(ValueError, match=rf"client 1 has a non-finite value \({bad_value}\) at position 1"):
        fk.scatter_add_aggregate(indices, values, 100, backend=backend)
    with pytest.raises(ValueError, match=r"client 1 has a non-finite value"):
        fk.scatter_add_average(indices, values, torch.zeros(100, device=device), backend=backend)


@pytest.mark.parametrize("backend,device", AGG)
def test_non_finite_value_in_long_sorted_update(backend, device):
    """The fast paths must not miss a NaN deep inside a long run (vector lanes, tiles)."""
    n = 300_000
    idx = torch.arange(0, n, 2, device=device, dtype=torch.int32)
    val = torch.randn(idx.numel(), device=device)
    val[idx.numel() - 3] = float("nan")
    with pytest.raises(ValueError, match=rf"client 0 has a non-finite value \(nan\) at position {idx.numel() - 3}"):
        fk.scatter_add_aggregate([idx], [val], n, backend=backend)


@pytest.mark.parametrize("backend,device", AGG)
def test_index_errors_are_reported_before_value_errors(backend, device):
    indices, values = _good(device)
    values[0] = torch.tensor([1.0, float("nan"), 2.0], device=device)
    indices[1] = torch.tensor([2, 100], device=device)
    with pytest.raises(ValueError, match="client 1 has index 100"):
        fk.scatter_add_aggregate(indices, values, 100, backend=backend)


@pytest.mark.parametrize("backend,device", AGG)
def test_entries_with_n_zero(backend, device):
    indices, values = _good(device)
    with pytest.raises(ValueError, match=r"client 0 has index 1 at position 0, outside \[0, 0\)"):
        fk.scatter_add_aggregate(indices, values, 0, backend=backend)
    total, count = fk.scatter_add_aggregate([torch.zeros(0, dtype=torch.int64, device=device)],
                                            [torch.zeros(0, device=device)], 0, backend=backend)
    assert total.shape == (0,) and count.shape == (0,)


@pytest.mark.parametrize("backend,device", AGG)
def test_bad_metadata(backend, device):
    indices, values = _good(device)
    with pytest.raises(ValueError, match="client 1 has 2 indices but 3 values"):
        fk.scatter_add_aggregate(indices, [values[0], torch.ones(3, device=device)], 100, backend=backend)
    with pytest.raises(ValueError, match="2 index tensors but 1 value tensors"):
        fk.scatter_add_aggregate(indices, values[:1], 100, backend=backend)
    with pytest.raises(TypeError, match="client 0 indices must be int32 or int64, got torch.float32"):
        fk.scatter_add_aggregate([indices[0].float(), indices[1]], values, 100, backend=backend)
    with pytest.raises(TypeError, match="client 1 values must be float16, bfloat16, float32 or float64"):
        fk.scatter_add_aggregate(indices, [values[0], values[1].long()], 100, backend=backend)
    with pytest.raises(TypeError, match="client 1 indices are torch.int32 but client 0's are torch.int64"):
        fk.scatter_add_aggregate([indices[0], indices[1].int()], values, 100, backend=backend)
    with pytest.raises(ValueError, match="must be 1-D"):
        fk.scatter_add_aggregate([indices[0].reshape(3, 1), indices[1]], [values[0].reshape(3, 1), values[1]], 100,
                                 backend=backend)
    with pytest.raises(ValueError, match="n must be >= 0"):
        fk.scatter_add_aggregate(indices, values, -1, backend=backend)
    with pytest.raises(TypeError, match="n must be an int"):
        fk.scatter_add_aggregate(indices, values, 100.0, backend=backend)
    with pytest.raises(ValueError, match="client 1 has weight -1;"):
        fk.scatter_add_aggregate(indices, values, 100, [1.0, -1.0], backend=backend)
    with pytest.raises(ValueError, match="client 0 has weight nan"):
        fk.scatter_add_aggregate(indices, values, 100, [float("nan"), 1.0], backend=backend)
    with pytest.raises(ValueError, match="one entry per client"):
        fk.scatter_add_aggregate(indices, values, 100, [1.0, 1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="coverage must be 'count' or 'weight'"):
        fk.scatter_add_aggregate(indices, values, 100, coverage="mean", backend=backend)
    with pytest.raises(TypeError, match="sequence of tensors"):
        fk.scatter_add_aggregate(indices[0], values, 100, backend=backend)
    with pytest.raises(TypeError, match="previous must be a floating tensor"):
        fk.scatter_add_average(indices, values, torch.zeros(100, dtype=torch.int64, device=device), backend=backend)


def test_tensors_on_different_devices():
    indices = [torch.tensor([1, 2]), torch.tensor([3], device="meta")]
    values = [torch.ones(2), torch.ones(1)]
    with pytest.raises(ValueError, match="client 1 has indices on meta and values on cpu"):
        fk.scatter_add_aggregate(indices, values, 10)
    with pytest.raises(ValueError, match="weights are on meta but the updates are on cpu"):
        fk.scatter_add_aggregate(indices[:1], values[:1], 10, torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="previous is on meta"):
        fk.scatter_add_average(indices[:1], values[:1], torch.zeros(10, device="meta"))


@pytest.mark.parametrize("backend,device", AGG)
def test_native_op_checks_direct_calls(backend, device):
    """The registered ops validate their arguments themselves (they can be called without the wrapper)."""
    if backend == "reference":
        pytest.skip("the wrapper-free reference is covered by the dispatcher's default kernel")
    op = torch.ops.fedspa.scatter_add_aggregate_triton if backend == "triton" else torch.ops.fedspa.scatter_add_aggregate
    idx = [torch.tensor([0, 3], device=device)]
    val = [torch.ones(2, device=device)]
    with pytest.raises(TypeError, match="weights must be float32 or float64"):
        op(idx, val, torch.ones(1, dtype=torch.float16, device=device), 5, False)
    with pytest.raises(ValueError, match="one entry per client"):
        op(idx, val, torch.ones(2, device=device), 5, False)
    with pytest.raises(ValueError, match="client 0 has index 3 at position 1, outside"):
        op(idx, val, torch.ones(1, device=device), 3, False)
    with pytest.raises(ValueError, match="client 0 has weight -2"):
        op(idx, val, torch.full((1,), -2.0, device=device), 5, False)


def test_inputs_are_not_modified():
    indices, values = _updates(1000, [600, 700], sorted_=False, unique=False)
    copies = ([i.clone() for i in indices], [v.clone() for v in values])
    fk.scatter_add_aggregate(indices, values, 1000)
    fk.scatter_add_average(indices, values, torch.zeros(1000))
    assert all(torch.equal(a, b) for a, b in zip(indices, copies[0]))
    assert all(torch.equal(a, b) for a, b in zip(values, copies[1]))


# --------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", AGG)
def test_opcheck(backend, device):
    if backend == "reference":
        pytest.skip("the reference is the default kernel of the same op (checked through cpp/cuda devices)")
    suffix = "_triton" if backend == "triton" else ""
    agg = getattr(torch.ops.fedspa, "scatter_add_aggregate" + suffix)
    avg = getattr(torch.ops.fedspa, "scatter_add_average" + suffix)
    indices, values = _updates(300, [200, 0, 150], sorted_=False, unique=False, device=device)
    weights = torch.rand(3, device=device)
    torch.library.opcheck(agg, (indices, values, weights, 300, False))
    torch.library.opcheck(agg, (indices, values, weights, 300, True))
    torch.library.opcheck(avg, (indices, values, weights, torch.randn(15, 20, device=device)))


def test_fake_kernels_give_output_metadata():
    """Shapes, dtypes and devices come from the fake kernels under FakeTensorMode (torch.compile's view)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        idx = [torch.empty(5, dtype=torch.int64)]
        val = [torch.empty(5)]
        total, count = torch.ops.fedspa.scatter_add_aggregate(idx, val, torch.empty(1), 17, False)
        assert total.shape == (17,) and count.shape == (17,) and total.dtype == torch.float32
        out = torch.ops.fedspa.scatter_add_average(idx, val, torch.empty(1, dtype=torch.float64),
                                                   torch.empty(3, 4, dtype=torch.float16))
        assert out.shape == (3, 4) and out.dtype == torch.float16


def test_the_reference_accepts_int32_indices_for_n_beyond_int32():
    """An int32 index can never reach n >= 2^31: only negative ones are out of range (was: every index refused)."""
    idx = torch.tensor([0, 5, 2**31 - 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="client 0 has index -1 at position 1, outside"):
        fk.scatter_add_aggregate_reference([torch.tensor([0, -1], dtype=torch.int32)], [torch.ones(2)],
                                           torch.ones(1), 2**31 + 10)
    from fedspa_kernels._checks import out_of_range

    assert not out_of_range(idx, 2**31 + 10).any()
    assert out_of_range(idx, 6).tolist() == [False, False, True]
