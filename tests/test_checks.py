"""Setting checks: one ValueError naming the owner and the setting (enginekit/checks.py)."""

from __future__ import annotations

import math
import re

import pytest

from enginekit.checks import check_count, check_number


@pytest.mark.parametrize("value", [0, -1, 2.0, True, math.nan, "3", None])
def test_check_count_refuses_what_is_not_a_whole_number_in_range(value):
    with pytest.raises(ValueError, match=rf"^Owner: n must be an int >= 1, got {re.escape(repr(value))}$"):
        check_count("Owner: ", "n", value)


def test_check_count_returns_the_value_and_honours_the_minimum():
    assert check_count("O: ", "n", 0, minimum=0) == 0 and check_count("O: ", "n", 7) == 7


@pytest.mark.parametrize(
    "value, kwargs",
    [(math.nan, {}), (math.inf, {}), (-math.inf, {}), (True, {}), ("1", {}), (-0.1, {"minimum": 0}), (0, {"above": 0})],
)
def test_check_number_refuses_non_finite_and_out_of_range(value, kwargs):
    with pytest.raises(ValueError, match=r"^Owner: x must be a finite number"):
        check_number("Owner: ", "x", value, **kwargs)


def test_check_number_gives_a_float():
    value = check_number("O: ", "x", 3, minimum=0)
    assert value == 3.0 and isinstance(value, float)
    assert check_number("O: ", "x", 1e-9, above=0) == 1e-9
