"""Installed plugins: found through the ``enginekit`` entry-point group, enabled only by name."""

from __future__ import annotations

import textwrap

import pytest

from enginekit import hookimpl
from enginekit.discovery import installed_plugins, load_plugin
from enginekit.testing import drive, make_engine


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A site-packages folder with two installed distributions declaring enginekit entry points."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "counting_plugin.py").write_text(
        textwrap.dedent(
            """
            from enginekit import hookimpl

            class StepCounter:
                def __init__(self, every=1):
                    self.every = every
                    self.steps = 0

                @hookimpl
                def after_step(self, engine, loss):
                    self.steps += 1

            def make_counter(every=1):
                return StepCounter(every)

            shared = StepCounter()
            shared.plugin_name = "shared_counter"

            def nothing():
                return object()
            """
        )
    )
    (site / "broken_plugin.py").write_text("import this_module_does_not_exist\n")
    for dist, entry in [
        (
            "counting-plugin",
            "counter = counting_plugin:StepCounter\ncounter_factory = counting_plugin:make_counter\n"
            "counter_instance = counting_plugin:shared\nhollow = counting_plugin:nothing",
        ),
        ("broken-plugin", "broken = broken_plugin:Thing"),
    ]:
        info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[enginekit]\n{entry}\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_discovery_through_an_installed_entry_point(fake_site):
    found = installed_plugins()
    assert {"counter", "broken"} <= set(found)
    assert found["counter"].value == "counting_plugin:StepCounter"


def test_enabling_by_name_registers_an_instance_under_that_name(fake_site):
    class Other:
        @hookimpl
        def after_step(self, engine, loss):
            pass

    run = drive(["counter", Other()], steps_per_epoch=3)
    counter = run.engine.plugins["counter"]
    assert type(counter).__name__ == "StepCounter" and counter.steps == 3


def test_installed_plugins_are_not_switched_on_silently(fake_site):
    engine = make_engine([])
    assert "counter" not in engine.plugins


def test_autoload_registers_every_installed_plugin_when_asked(fake_site, monkeypatch):
    from enginekit import discovery

    eps = {k: v for k, v in installed_plugins().items() if k == "counter"}
    monkeypatch.setattr(discovery, "installed_plugins", lambda third_party_only=False: eps)
    engine = make_engine([], autoload_plugins=True)
    assert "counter" in engine.plugins


def test_unknown_name_lists_the_available_ones(fake_site):
    with pytest.raises(
        ValueError, match="no enginekit plugin named 'counterr' \\(did you mean 'counter'\\?\\); available: .*broken.*"
    ):
        make_engine(["counterr"])


def test_plugins_by_name_take_settings_as_a_dict(fake_site):
    engine = make_engine([("counter", {"every": 2}), ("counter_factory", {"every": 3})])
    assert engine.plugins["counter"].every == 2 and engine.plugins["counter_factory"].every == 3
    assert type(engine.plugins["counter_factory"]).__name__ == "StepCounter"  # the factory's product


def test_an_instance_entry_point_keeps_its_own_name_and_takes_no_settings(fake_site):
    assert "shared_counter" in make_engine(["counter_instance"]).plugins
    with pytest.raises(
        ValueError, match="'counter_instance' is a ready-made StepCounter instance and takes no settings"
    ):
        make_engine([("counter_instance", {"every": 2})])


def test_a_factory_returning_no_plugin_and_a_misspelled_setting_are_refused(fake_site):
    with pytest.raises(ValueError, match="plugin 'hollow' \\(<object object at .*\\) implements no hook"):
        make_engine(["hollow"])
    with pytest.raises(ValueError, match="has no setting 'evry' \\(did you mean 'every'\\?\\); its settings: every=1"):
        make_engine([("counter", {"evry": 2})])


def test_built_in_plugins_are_enabled_by_name_with_settings():
    engine = make_engine([("early_stopping", {"patience": 2, "min_delta": 0.05})])
    stopper = engine.plugins["early_stopping"]
    assert type(stopper).__name__ == "EarlyStopping" and (stopper.patience, stopper.min_delta) == (2, 0.05)
    with pytest.raises(ValueError, match="EarlyStopping: patience must be an int >= 1, got 0"):
        make_engine([("early_stopping", {"patience": 0})])


def test_broken_entry_point_names_distribution_and_entry_point(fake_site):
    with pytest.raises(ImportError) as info:
        load_plugin("broken")
    message = str(info.value)
    assert "'broken'" in message and "broken_plugin:Thing" in message and "broken-plugin 1.2.3" in message
    assert "this_module_does_not_exist" in message


def test_registering_a_class_instead_of_an_instance_is_a_clear_error():
    from enginekit.plugins import GradClip

    with pytest.raises(TypeError, match="GradClip is a class; register an instance"):
        make_engine([GradClip])


def test_the_example_ema_package_is_found_and_its_state_survives_a_checkpoint(tmp_path):
    pytest.importorskip("enginekit_ema", reason="install examples/enginekit-ema (CI does)")
    import torch

    from enginekit.plugins import Checkpoint

    assert installed_plugins()["ema"].dist.name == "enginekit-ema"
    first = drive(["ema", Checkpoint(tmp_path, every_steps=2)], steps_per_epoch=4, lr=0.3)
    ema = first.engine.plugins["ema"]
    engine = make_engine(["ema", Checkpoint(tmp_path, resume=True)], steps_per_epoch=4, lr=0.3)
    engine.fit()  # complete already: restores, runs no step
    restored = engine.plugins["ema"]
    assert restored is not ema and restored.updates == ema.updates == 4
    assert torch.equal(restored.shadow[0], ema.shadow[0])
