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
                def __init__(self):
                    self.steps = 0

                @hookimpl
                def after_step(self, engine, loss):
                    self.steps += 1
            """
        )
    )
    (site / "broken_plugin.py").write_text("import this_module_does_not_exist\n")
    for dist, entry in [
        ("counting-plugin", "counter = counting_plugin:StepCounter"),
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
        ValueError, match="no installed enginekit plugin named 'counterr'; available: .*broken.*counter"
    ):
        make_engine(["counterr"])


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
