"""engine.lr_scales (schedules set, modifiers scale) and finding the plugin that sets a plan fact."""

from __future__ import annotations

import math

import pytest

from enginekit import hookimpl
from enginekit.plan import LRScales, plugin_on_stack
from enginekit.testing import drive, make_engine


def test_the_product_does_not_depend_on_who_set_a_factor_first():
    a, b = LRScales(), LRScales()
    for name, factor in [("x", 0.1), ("y", 3.0), ("z", 0.7)]:
        a[name] = factor
    for name, factor in [("z", 0.7), ("x", 0.1), ("y", 3.0)]:
        b[name] = factor
    assert a.factors(1) == b.factors(1) == [0.1 * 3.0 * 0.7]  # multiplied in name order, bit for bit
    assert list(a) == ["x", "y", "z"]


def test_apply_then_restore_leaves_the_base():
    scales = LRScales()
    scales["m"] = [0.5, 2.0]
    groups = [{"lr": 1.0}, {"lr": 0.25}]
    base = scales.apply(groups)
    assert [g["lr"] for g in groups] == [0.5, 0.5] and base == [1.0, 0.25]
    scales.restore(groups, base)
    assert [g["lr"] for g in groups] == [1.0, 0.25]


def test_state_round_trips_as_plain_values():
    scales = LRScales()
    scales["a"], scales["b"] = 0.5, (0.1, 0.2)
    state = scales.state_dict()
    assert state == {"a": 0.5, "b": [0.1, 0.2]}
    again = LRScales()
    again.load_state_dict(state)
    assert again.factors(2) == scales.factors(2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5, True, "0.5", []])
def test_bad_factors_are_refused(bad):
    with pytest.raises(ValueError, match=r"engine.lr_scales\['m'\]"):
        LRScales()["m"] = bad


def test_the_step_is_untouched_without_a_factor_and_the_engine_saves_the_factors():
    engine = make_engine([], steps_per_epoch=3, lr=0.5)
    engine.fit()
    assert engine.state_dict()["lr_scales"] == {}
    engine.lr_scales["manual"] = 0.5
    engine.fit(epochs=2)
    assert engine.metrics["lr"] == 0.25 and engine.optimizer.param_groups[0]["lr"] == 0.5
    other = make_engine([], steps_per_epoch=3)
    other.load_state_dict(engine.state_dict())
    assert dict(other.lr_scales) == {"manual": 0.5}


def test_plugin_on_stack_names_the_plugin_whose_code_runs():
    seen = []

    class Helper:
        def __init__(self, engine) -> None:
            self.engine = engine

        def look(self):
            return plugin_on_stack(self.engine.pm)

    class Owner:
        @hookimpl
        def before_fit(self, engine):
            seen.append(plugin_on_stack(engine.pm))
            seen.append(self._through_a_method(engine))
            seen.append(Helper(engine).look())  # a helper object: still inside Owner's hook

        def _through_a_method(self, engine):
            return plugin_on_stack(engine.pm)

    run = drive(("owner", Owner()), steps_per_epoch=1)
    assert seen == ["owner"] * 3
    assert plugin_on_stack(run.engine.pm) is None  # outside any plugin


def test_name_of_is_the_registration_name():
    class P:
        @hookimpl
        def before_fit(self, engine):
            pass

    plugin = P()
    engine = make_engine([("mine", plugin)])
    assert engine.name_of(plugin) == "mine"
    with pytest.raises(ValueError, match="is not registered with this engine"):
        engine.name_of(P())


def test_active_follows_the_factors():
    scales = LRScales()
    assert not scales.active
    scales["a"] = 0.5
    assert scales.active
    del scales["a"]
    assert not scales.active
    scales.load_state_dict({"b": 0.5})
    assert scales.active
    scales.load_state_dict({})
    assert not scales.active
