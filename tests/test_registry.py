"""The registry calls hooks through pluggy: pluggy's order, arguments by name, wrappers and
monitors as pluggy documents them, registration changes from the next call on, and a failing
implementation named on its exception."""

from __future__ import annotations

from typing import Any

import pytest

from enginekit import hookimpl, plugin_failure
from enginekit.testing import make_engine

Log = list[tuple[str, str, tuple[Any, ...]]]


def _short(value: Any) -> Any:
    """What a log keeps of an argument: the engine as a marker, tensors as floats."""
    if hasattr(value, "state") and hasattr(value, "metrics"):
        return "engine"
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return round(float(value.item()), 6)
    if isinstance(value, (list, tuple)):
        return "batch"
    return value


class Plain:
    """Every step hook, taking exactly the hook's arguments in the hook's order."""

    def __init__(self, name: str, log: Log) -> None:
        self.name, self.log = name, log

    @hookimpl
    def before_step(self, engine: Any, batch: Any) -> None:
        self.log.append((self.name, "before_step", (_short(engine), _short(batch))))

    @hookimpl
    def after_backward(self, engine: Any) -> None:
        self.log.append((self.name, "after_backward", (_short(engine),)))

    @hookimpl
    def after_step(self, engine: Any, loss: Any) -> None:
        self.log.append((self.name, "after_step", (_short(engine), _short(loss))))

    @hookimpl
    def on_save_point(self, engine: Any, reason: str) -> None:
        self.log.append((self.name, "on_save_point", (reason,)))


class OddSignatures:
    """Subsets and permutations of the hook's arguments, no argument at all, tryfirst and trylast."""

    def __init__(self, log: Log) -> None:
        self.log = log

    @hookimpl(tryfirst=True)
    def before_step(self) -> None:
        self.log.append(("odd", "before_step", ()))

    @hookimpl(trylast=True)
    def after_step(self, loss: Any, engine: Any) -> None:
        self.log.append(("odd", "after_step", (_short(loss), _short(engine))))

    @hookimpl
    def on_save_point(self, reason: str) -> None:
        self.log.append(("odd", "on_save_point", (reason,)))


class WithDefault:
    """An argument with a default value: pluggy passes it by keyword."""

    def __init__(self, log: Log) -> None:
        self.log = log

    @hookimpl
    def after_step(self, engine: Any, loss: Any = None) -> None:
        self.log.append(("default", "after_step", (_short(loss),)))


class Registers:
    """Registers a plugin during step 1's after_step and unregisters it at step 3's."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.late = Plain("late", log)

    @hookimpl
    def after_step(self, engine: Any) -> None:
        if engine.state.step == 1:
            engine.register(self.late, name="late")
        if engine.state.step == 3:
            engine.pm.unregister(self.late)


def run(plugins: list[Any], *, monitored: bool) -> tuple[Any, list[str]]:
    """Two epochs of 3 steps; ``monitored`` attaches a no-op monitor, so pluggy makes every call."""
    engine = make_engine(plugins, steps_per_epoch=3)
    if monitored:
        engine.pm.add_hookcall_monitoring(lambda *a: None, lambda *a: None)
    engine.fit(epochs=2)
    return engine, []


def both_ways(make_plugins: Any) -> tuple[Log, Log]:
    direct: Log = []
    run(make_plugins(direct), monitored=False)
    through_pluggy: Log = []
    run(make_plugins(through_pluggy), monitored=True)
    return direct, through_pluggy


def test_calls_come_in_pluggys_order_with_arguments_by_name_monitored_or_not() -> None:
    direct, through_pluggy = both_ways(
        lambda log: [("a", Plain("a", log)), ("odd", OddSignatures(log)), ("b", Plain("b", log))]
    )
    assert direct == through_pluggy
    step0 = [(name, hook) for name, hook, _ in direct[:7]]
    # tryfirst first, then the last registered first
    assert step0 == [
        ("odd", "before_step"),
        ("b", "before_step"),
        ("a", "before_step"),
        ("b", "after_backward"),
        ("a", "after_backward"),
        ("b", "after_step"),
        ("a", "after_step"),
    ]
    assert ("odd", "after_step", (direct[7][2][0], "engine")) == direct[7]  # permuted arguments arrive by name


def test_a_plugin_registered_through_pluggy_itself_is_called_from_the_next_hook() -> None:
    log: Log = []
    engine = make_engine([Plain("a", log)], steps_per_epoch=3)
    engine.fit(max_steps=1)
    engine.pm.register(Plain("b", log), name="b")  # pluggy's own API, not engine.register
    engine.fit(max_steps=2)
    step1 = [(name, hook) for name, hook, _ in log if hook == "after_backward"]
    assert step1 == [("a", "after_backward"), ("b", "after_backward"), ("a", "after_backward")]


def test_defaults_and_wrappers_behave_as_pluggy_documents_them() -> None:
    class Wrapper:
        def __init__(self, log: Log) -> None:
            self.log = log

        @hookimpl(wrapper=True)
        def after_step(self, engine: Any) -> Any:
            self.log.append(("wrapper", "after_step", ("before",)))
            result = yield
            self.log.append(("wrapper", "after_step", ("after",)))
            return result

    direct, through_pluggy = both_ways(lambda log: [Plain("a", log), WithDefault(log), Wrapper(log)])
    assert direct == through_pluggy
    step0 = [entry for entry in direct if entry[1] == "after_step"][:4]
    assert step0 == [
        ("wrapper", "after_step", ("before",)),
        ("default", "after_step", (step0[1][2][0],)),
        ("a", "after_step", ("engine", step0[1][2][0])),
        ("wrapper", "after_step", ("after",)),
    ]


def test_registration_during_fit_takes_effect_from_the_next_hook_call() -> None:
    direct, through_pluggy = both_ways(lambda log: [Registers(log)])
    assert direct == through_pluggy
    late = [(hook, args[0] if hook == "on_save_point" else None) for name, hook, args in direct if name == "late"]
    # registered inside step 1's after_step, so first called at step 1's save point; at step 3 it
    # runs its after_step (the last registered runs first) before Registers unregisters it
    assert late == [
        ("on_save_point", "step"),  # step 1
        ("before_step", None),  # step 2, the epoch's last
        ("after_backward", None),
        ("after_step", None),
        ("on_save_point", "step"),
        ("on_save_point", "epoch"),
        ("before_step", None),  # step 3
        ("after_backward", None),
        ("after_step", None),
    ]


def test_a_monitor_attached_mid_fit_sees_the_calls_from_then_on() -> None:
    seen: list[tuple[str, int]] = []

    class Attaches:
        undo: Any = None

        @hookimpl
        def after_step(self, engine: Any) -> None:
            if engine.state.step == 1:
                self.undo = engine.pm.add_hookcall_monitoring(
                    lambda name, impls, kwargs: seen.append((name, engine.state.step)), lambda *a: None
                )
            if engine.state.step == 3:
                self.undo()

    engine = make_engine([Attaches()], steps_per_epoch=6)
    engine.fit()
    # from step 1's save point (the counters have moved: state.step is 2) to step 3's after_step
    assert seen == [
        ("on_save_point", 2),
        ("before_step", 2),
        ("after_backward", 2),
        ("before_optimizer_step", 2),
        ("after_step", 2),
        ("on_save_point", 3),
        ("before_step", 3),
        ("after_backward", 3),
        ("before_optimizer_step", 3),
        ("after_step", 3),
    ]


def test_a_hook_that_raises_names_the_plugin_and_the_step() -> None:
    class Bad:
        @hookimpl
        def after_backward(self, engine: Any) -> None:
            if engine.state.step == 2:
                raise ValueError("bad gradients")

    engine = make_engine([("good", Plain("good", [])), ("bad", Bad())])
    with pytest.raises(ValueError) as info:
        engine.fit()
    assert str(info.value) == "bad gradients"
    assert info.value.__notes__ == ["plugin 'bad' failed in hook 'after_backward' at step 2 (epoch 1)"]
    failure = plugin_failure(info.value)
    assert (failure.plugin_name, failure.hook_name, failure.step, failure.epoch) == ("bad", "after_backward", 2, 0)
    assert type(info.value) is ValueError  # the plugin's own exception, not a generated subclass


def test_an_error_in_a_nested_hook_is_named_once_by_the_innermost_hook() -> None:
    from enginekit import describe_error

    class Reports:
        @hookimpl
        def after_step(self, engine: Any) -> None:
            engine.publish_evaluation({"val_loss": 1.0})

    class Reacts:
        @hookimpl
        def after_evaluate(self, engine: Any, metrics: Any) -> None:
            raise KeyError("val_los")

    engine = make_engine([Reports(), Reacts()], steps_per_epoch=2)
    with pytest.raises(KeyError) as info:
        engine.fit()
    assert info.value.__notes__ == ["plugin 'reacts' failed in hook 'after_evaluate' at step 0 (epoch 1)"]
    assert describe_error(info.value) == (
        "plugin 'reacts' failed in hook 'after_evaluate' at step 0 (epoch 1): KeyError: 'val_los'"
    )
    assert describe_error(ValueError("engine's own")) == "engine's own" and plugin_failure(ValueError()) is None
