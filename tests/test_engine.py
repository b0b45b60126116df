from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine, hookimpl, plugin_failure
from enginekit.gpt import GPTModel
from enginekit.testing import HookRecorder, drive, make_engine

from conftest import gpt_loader


def step_hooks(n: int) -> list[str]:
    return ["before_step", "after_backward", "before_optimizer_step", "after_step", "on_save_point"] * n


def test_hook_order_for_two_epochs():
    run = drive([], epochs=2, steps_per_epoch=3)
    expected = (
        ["before_fit"]
        + ["before_epoch", *step_hooks(3), "after_epoch", "on_save_point"]
        + ["before_epoch", *step_hooks(3), "after_epoch", "on_save_point"]
        + ["after_fit"]
    )
    assert run.hooks == expected


class StepSpy:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, int]] = []

    def _see(self, hook: str, engine: Engine) -> None:
        st = engine.state
        self.seen.append((hook, st.step, st.epoch, st.step_in_epoch))

    @hookimpl
    def before_step(self, engine, batch):
        self._see("before_step", engine)

    @hookimpl
    def after_backward(self, engine):
        self._see("after_backward", engine)

    @hookimpl
    def after_step(self, engine, loss):
        self._see("after_step", engine)

    @hookimpl
    def after_epoch(self, engine):
        self._see("after_epoch", engine)


def test_step_index_is_zero_based_and_the_same_in_every_hook_of_a_step():
    spy = StepSpy()
    run = drive(spy, epochs=2, steps_per_epoch=3)
    per_step = [s for s in spy.seen if s[0] != "after_epoch"]
    assert [s[1] for s in per_step] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert [s[3] for s in per_step[::3]] == [0, 1, 2, 0, 1, 2]
    assert [s[2] for s in per_step[::3]] == [0, 0, 0, 1, 1, 1]
    # outside a step the counter counts completed steps
    assert [s for s in spy.seen if s[0] == "after_epoch"] == [("after_epoch", 3, 0, 3), ("after_epoch", 6, 1, 3)]
    assert run.engine.state.step == 6 and run.engine.state.total_steps == 6


class GradGrabber:
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.calls = {"before_step": 0, "after_backward": 0, "after_step": 0}

    @hookimpl
    def before_step(self, engine, batch):
        self.calls["before_step"] += 1

    @hookimpl
    def after_backward(self, engine):
        self.calls["after_backward"] += 1
        self.grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters()})

    @hookimpl
    def after_step(self, engine, loss):
        self.calls["after_step"] += 1


def test_four_micro_batches_give_the_gradients_of_one_batch_four_times_as_large(tiny_cfg):
    cfg = {**tiny_cfg, "drop_rate": 0.0}
    results = []
    for batch_size, accum in [(8, 1), (2, 4)]:
        torch.manual_seed(0)
        model = GPTModel(cfg).double()
        grabber = GradGrabber()
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpt_loader(cfg, 16, batch_size),
            plugins=[grabber],
            device="cpu",
            grad_accum_steps=accum,
        )
        engine.fit(epochs=1)
        results.append(grabber)
        assert engine.state.total_steps == 2 and engine.state.tokens_seen == 16 * cfg["context_length"]
    big, small = results
    assert small.calls == {"before_step": 2, "after_backward": 2, "after_step": 2}
    for g_big, g_small in zip(big.grads, small.grads):
        for name in g_big:
            torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-10, atol=1e-12)


def test_accumulation_passes_the_micro_batches_to_before_step():
    class Batches:
        seen: list = []

        @hookimpl
        def before_step(self, engine, batch):
            self.seen.append(len(batch))

    drive(Batches(), steps_per_epoch=2, grad_accum_steps=3)
    assert Batches.seen == [3, 3]


def test_should_stop_ends_the_run_after_the_current_step():
    class StopAtTwo:
        @hookimpl
        def before_step(self, engine, batch):
            if engine.state.step == 2:
                engine.state.should_stop = True

    run = drive(StopAtTwo(), epochs=3, steps_per_epoch=4)
    assert run.hooks[-8:] == [
        *["before_step", "after_backward", "before_optimizer_step", "after_step", "on_save_point"],
        *["after_epoch", "on_save_point", "after_fit"],
    ]
    assert len(run.steps) == 3 and run.engine.state.step == 3


def test_misspelled_hook_fails_at_registration_naming_plugin_and_hook():
    class Typo:
        @hookimpl
        def after_backwards(self, engine):
            pass

    with pytest.raises(
        ValueError,
        match="plugin 'typo' implements unknown hook.*'after_backwards' \\(did you mean 'after_backward'\\?\\)",
    ):
        make_engine([Typo()])


def test_hook_method_without_decorator_is_still_called():
    class Undecorated:
        calls = 0

        def after_step(self, engine, loss):
            Undecorated.calls += 1

    drive(Undecorated(), steps_per_epoch=3)
    assert Undecorated.calls == 3


def test_wrong_hook_arguments_are_rejected_with_the_plugin_name():
    class BadArgs:
        @hookimpl
        def after_step(self, engine, losss):
            pass

    with pytest.raises(
        ValueError, match="(?s)plugin 'bad_args' cannot be registered.*losss.*after_step\\(engine, loss\\)"
    ):
        make_engine([BadArgs()])


def test_duplicate_name_says_how_to_name_the_second_plugin():
    class Plug:
        @hookimpl
        def after_step(self, engine, loss):
            pass

    engine = make_engine([Plug()])
    with pytest.raises(ValueError, match="already registered.*name='plug_2'"):
        engine.register(Plug())
    engine.register(Plug(), name="plug_2")
    assert list(engine.plugins) == ["plug", "plug_2"]


def test_plugin_error_names_plugin_and_hook_and_keeps_the_cause():
    class Fine:
        @hookimpl
        def after_step(self, engine, loss):
            pass

    class Broken:
        @hookimpl
        def after_step(self, engine, loss):
            if engine.state.step == 1:
                raise KeyError("boom")

    with pytest.raises(KeyError) as info:
        drive([Fine(), ("my_broken", Broken()), ("fine_too", Fine())], steps_per_epoch=4)
    err = info.value
    assert type(err) is KeyError and err.args == ("boom",)  # what the plugin raised, itself
    failure = plugin_failure(err)
    assert failure.plugin_name == "my_broken" and failure.hook_name == "after_step"
    assert "plugin 'my_broken' failed in hook 'after_step' at step 1" in err.__notes__[0]


def test_plugin_value_error_stays_a_value_error():
    class Picky:
        @hookimpl
        def before_fit(self, engine):
            raise ValueError("Picky: setting x is wrong")

    with pytest.raises(ValueError, match="setting x is wrong") as info:
        drive(Picky())
    assert info.value.__notes__ == ["plugin 'picky' failed in hook 'before_fit' at step 0 (epoch 1)"]


def test_on_exception_sees_the_error_and_after_fit_does_not_fire():
    class Boom:
        @hookimpl
        def after_backward(self, engine):
            raise RuntimeError("x")

    engine = make_engine([Boom()])
    rec = HookRecorder(engine)
    with pytest.raises(RuntimeError) as info:
        engine.fit()
    assert str(info.value) == "x" and plugin_failure(info.value).hook_name == "after_backward"
    assert rec.hooks[-2:] == ["after_backward", "on_exception"]
    assert "after_fit" not in rec.hooks


def test_bad_engine_settings_are_named(tiny_cfg):
    model = GPTModel(tiny_cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = gpt_loader(tiny_cfg, 4, 2)
    with pytest.raises(ValueError, match="precision"):
        Engine(model, opt, loader, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        Engine(model, opt, loader, device="cpu", grad_accum_steps=0)
    with pytest.raises(ValueError, match="nonfinite"):
        Engine(model, opt, loader, device="cpu", nonfinite="ignore")


def test_empty_loader_is_a_clear_error(tiny_cfg):
    model = GPTModel(tiny_cfg)
    empty = DataLoader(
        TensorDataset(torch.zeros(0, 16, dtype=torch.long), torch.zeros(0, 16, dtype=torch.long)), batch_size=2
    )
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), empty, device="cpu")
    with pytest.raises(ValueError, match="train_loader is empty"):
        engine.fit()


def test_max_steps_caps_the_run_and_the_plan():
    run = drive([], epochs=5, steps_per_epoch=4, max_steps=6)
    assert run.engine.state.total_steps == 6 and len(run.steps) == 6
    run = drive([], steps_per_epoch=4, max_steps=10)  # epochs derived from max_steps
    assert run.engine.state.epochs == 3 and len(run.steps) == 10


def test_a_finished_engine_says_there_is_nothing_to_train():
    engine = make_engine(steps_per_epoch=2)
    engine.fit()
    with pytest.raises(ValueError, match="nothing to train: this engine has done 2 steps and the plan is 2"):
        engine.fit()


def test_unknown_device_is_a_clear_error(tiny_cfg):
    model = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="device 'gpu0' is not a device torch knows"):
        Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), gpt_loader(tiny_cfg, 4, 2), device="gpu0")


def test_an_error_passing_through_a_wrappers_yield_names_the_plugin_that_raised():
    class Wraps:
        @hookimpl(wrapper=True)
        def before_fit(self, engine):
            return (yield)

    class Fails:
        @hookimpl
        def before_fit(self, engine):
            raise ValueError("bad setting")

    with pytest.raises(ValueError, match="bad setting") as info:
        drive([Wraps(), Fails()], steps_per_epoch=2)
    assert plugin_failure(info.value).plugin_name == "fails"  # not the wrapper the error passed through


# ---------------------------------------------------------------- loss normalization under accumulation (issue 29)


def _uneven_gradients(cfg, batch_size: int, accum: int) -> dict:
    """The gradients of one step over 5 sequences whose targets are partly ``ignore_index``."""
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, cfg["vocab_size"], (5, cfg["context_length"]), generator=g)
    targets = torch.randint(0, cfg["vocab_size"], (5, cfg["context_length"]), generator=g)
    targets[0, 3:] = -100  # padded: 3 target tokens in the first sequence, 16 in the others
    targets[4, :10] = -100  # 6 in the last one, which is a micro-batch of its own (drop_last=False)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False)
    torch.manual_seed(0)
    model = GPTModel(cfg).double()
    grabber = GradGrabber()
    engine = Engine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        plugins=[grabber],
        device="cpu",
        grad_accum_steps=accum,
    )
    engine.fit(max_steps=1)
    return grabber.grads[0]


def test_accumulated_gradients_on_uneven_micro_batches_equal_the_big_batchs(tiny_cfg):
    # micro-batches of 2, 2 and 1 sequences holding 19, 32 and 6 target tokens: the default lm_loss
    # weighs each by its target tokens, so the sum is the big batch's mean over all 57 of them
    cfg = {**tiny_cfg, "drop_rate": 0.0}
    big, accumulated = _uneven_gradients(cfg, 5, 1), _uneven_gradients(cfg, 2, 3)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-10, atol=1e-12)  # float64: exact but for order
