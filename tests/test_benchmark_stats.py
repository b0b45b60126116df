"""The intervals the checkpoint benchmark reports, against published tables."""

from __future__ import annotations

import math
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import mean_interval, median_interval  # noqa: E402


@pytest.mark.parametrize(
    ("n", "t_table"),  # Student's t, two-sided 95%, n - 1 degrees of freedom
    [(5, 2.776), (10, 2.262), (18, 2.110), (31, 2.042), (60, 2.001)],
)
def test_mean_interval_uses_students_t(n: int, t_table: float) -> None:
    values = [float(i * i % 7) for i in range(n)]
    mean, lo, hi = mean_interval(values)
    half = t_table * statistics.stdev(values) / math.sqrt(n)
    assert mean == pytest.approx(statistics.fmean(values))
    # the table's own rounding (0.0005) and the expansion's error with 5 values (0.007)
    assert hi - mean == pytest.approx(half, rel=0.003)
    assert mean - lo == pytest.approx(half, rel=0.003)


def test_mean_interval_refuses_to_guess_below_five_values() -> None:
    assert mean_interval([1.0, 2.0, 3.0, 4.0])[1:] == (-math.inf, math.inf)


@pytest.mark.parametrize(
    ("n", "rank"),  # the sign test's 95% ranks for the median (binomial n, 1/2)
    [(6, 1), (10, 2), (20, 6), (36, 12), (60, 22)],
)
def test_median_interval_takes_the_sign_tests_ranks(n: int, rank: int) -> None:
    values = [float(v) for v in reversed(range(1, n + 1))]  # k-th smallest is k
    median, lo, hi = median_interval(values)
    assert (median, lo, hi) == (statistics.median(values), rank, n + 1 - rank)


def test_median_interval_has_none_with_five_values() -> None:
    # even the extremes leave 2 x 1/32 = 6% outside: no 95% interval exists
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, -math.inf, math.inf)
