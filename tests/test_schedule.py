"""fedspa.schedule: the cosine-annealed drop fraction and per-layer drop counts."""

import math

import pytest

from fedspa.schedule import drop_counts, drop_fraction


def test_cosine_annealing_endpoints_and_midpoint():
    assert drop_fraction(0, 100, 0.5) == pytest.approx(0.5)
    assert drop_fraction(50, 100, 0.5) == pytest.approx(0.25)
    assert drop_fraction(100, 100, 0.5) == pytest.approx(0.0, abs=1e-12)
    assert drop_fraction(25, 100, 0.4) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    values = [drop_fraction(t, 40, 0.5) for t in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing


def test_drop_counts_round_and_cap():
    assert drop_counts([100, 10, 3], [200, 10, 4], 0.25) == [25, 0, 1]  # layer 1 is dense: nothing to regrow into
    assert drop_counts([0], [5], 0.5) == [0]


@pytest.mark.parametrize("call,message", [
    (lambda: drop_fraction(0, 0), "total_rounds must be >= 1"),
    (lambda: drop_fraction(11, 10), r"round_index must lie in \[0, 10\]"),
    (lambda: drop_fraction(0, 10, 1.5), r"initial must lie in \[0, 1\]"),
    (lambda: drop_counts([1], [2], -0.1), r"fraction must lie in \[0, 1\]"),
    (lambda: drop_counts([1, 2], [2], 0.1), "2 active counts for 1 layers"),
    (lambda: drop_counts([3], [2], 0.1), "layer 0 has 3 active weights of 2"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
