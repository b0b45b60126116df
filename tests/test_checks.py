"""Setting checks: one ValueError naming the owner and the setting, and the optimizer checked
before anything trains (enginekit/checks.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from enginekit import NonFiniteLossError
from enginekit.checks import check_count, check_number
from enginekit.testing import make_engine


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



@pytest.mark.parametrize(
    "key, value",
    [("momentum", math.nan), ("betas", (0.9, math.inf)), ("eps", math.nan), ("weight_decay", -math.inf)],
)
def test_a_non_finite_hyper_parameter_of_any_group_is_refused_at_fit_start(key, value):
    engine = make_engine(steps_per_epoch=2)
    if key == "momentum":  # torch's SGD accepts momentum=nan as it is
        engine.optimizer = torch.optim.SGD(engine.model.parameters(), lr=0.1, momentum=value)
    else:  # AdamW checks these when built, not when they are changed later (a state_dict, a plugin)
        engine.optimizer = torch.optim.AdamW(engine.model.parameters(), lr=1e-3)
        engine.optimizer.param_groups[0][key] = value
    before = [p.detach().clone() for p in engine.model.parameters()]
    with pytest.raises(ValueError, match=f"optimizer: param group 0's {key} must be finite, got"):
        engine.fit()
    assert all(torch.equal(a, p) for a, p in zip(before, engine.model.parameters()))  # nothing trained


def test_the_check_covers_every_group_not_only_the_first():
    engine = make_engine(steps_per_epoch=2)
    first, *rest = list(engine.model.parameters())
    engine.optimizer = torch.optim.SGD([{"params": [first]}, {"params": rest, "momentum": math.nan}], lr=0.1)
    with pytest.raises(ValueError, match="param group 1's momentum must be finite"):
        engine.fit()


def test_an_optimizer_over_another_models_parameters_is_refused_at_construction():
    template = make_engine(steps_per_epoch=2)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="optimizer: none of its parameters belongs to the model") as info:
        type(template)(template.model, torch.optim.SGD(other.parameters(), lr=0.1), template.train_loader)
    assert "\n" not in str(info.value)


def test_the_non_finite_loss_message_states_only_what_was_checked():
    with pytest.raises(NonFiniteLossError) as info:
        make_engine(steps_per_epoch=4, losses=[1.0, math.nan, 1.0, 1.0]).fit()
    message = str(info.value)
    assert "stopped before the update" in message and "this step's gradients reached neither" in message
    assert "hold the last finite state" not in message  # not checked: an earlier update may have poisoned them
