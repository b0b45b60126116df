"""Settings checked before anything trains: the optimizer's hyper-parameters and parameters (issue 29)."""

from __future__ import annotations

import math

import pytest
import torch

from enginekit import NonFiniteLossError
from enginekit.testing import make_engine


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
