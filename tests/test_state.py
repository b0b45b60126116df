"""TrainState: the counters, read-only while a save point writes them out (issue 29)."""

from __future__ import annotations

import pytest

from enginekit import PluginError, hookimpl
from enginekit.plugins import Checkpoint
from enginekit.testing import drive


class Bump:
    @hookimpl
    def on_save_point(self, engine, reason):
        engine.state.step += 100


@pytest.mark.parametrize("registered_first", [True, False])
def test_a_plugin_changing_counters_at_a_save_point_fails_naming_it(tmp_path, registered_first):
    checkpoint = Checkpoint(tmp_path, every_steps=1)
    plugins = [("bump", Bump()), checkpoint] if registered_first else [checkpoint, ("bump", Bump())]
    with pytest.raises(PluginError) as info:
        drive(plugins, steps_per_epoch=4)
    assert info.value.plugin_name == "bump" and info.value.hook_name == "on_save_point"
    assert "engine.state.step was changed in on_save_point" in str(info.value)
    assert info.value.__cause__ is not None


def test_counters_stay_writable_outside_save_points():
    class Stopper:
        @hookimpl
        def after_step(self, engine, loss):
            engine.state.should_stop = engine.state.step == 1

    run = drive(Stopper(), steps_per_epoch=4)
    assert run.engine.state.step == 2
