from __future__ import annotations

import signal
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from enginekit import Engine, NonFiniteLossError, PluginError, hookimpl
from enginekit.gpt import GPTModel
from enginekit.testing import HookRecorder, drive, make_engine

from conftest import DEVICES


def step_hooks(n: int) -> list[str]:
    return ["before_step", "after_backward", "after_step", "on_save_point"] * n


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


def gpt_loader(cfg, n_seqs: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (n_seqs, cfg["context_length"] + 1), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch_size, shuffle=False)


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
    assert run.hooks[-7:] == [
        *["before_step", "after_backward", "after_step", "on_save_point"],
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

    with pytest.raises(PluginError) as info:
        drive([Fine(), ("my_broken", Broken()), ("fine_too", Fine())], steps_per_epoch=4)
    err = info.value
    assert isinstance(err, KeyError)  # still catchable as what the plugin raised
    assert err.plugin_name == "my_broken" and err.hook_name == "after_step"
    assert "plugin 'my_broken' failed in hook 'after_step' at step 1" in str(err)
    assert isinstance(err.__cause__, KeyError)


def test_plugin_value_error_stays_a_value_error():
    class Picky:
        @hookimpl
        def before_fit(self, engine):
            raise ValueError("Picky: setting x is wrong")

    with pytest.raises(ValueError, match="plugin 'picky' failed in hook 'before_fit'.*setting x is wrong"):
        drive(Picky())


def test_on_exception_sees_the_error_and_after_fit_does_not_fire():
    class Boom:
        @hookimpl
        def after_backward(self, engine):
            raise RuntimeError("x")

    engine = make_engine([Boom()])
    rec = HookRecorder(engine)
    with pytest.raises(PluginError):
        engine.fit()
    assert rec.hooks[-2:] == ["after_backward", "on_exception"]
    assert "after_fit" not in rec.hooks


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocasts_the_matmuls(tiny_cfg, device):
    dtypes = {}
    for precision in ("fp32", "bf16"):
        model = GPTModel(tiny_cfg)
        seen = []
        model.out_head.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.dtype))
        engine = Engine(
            model, torch.optim.AdamW(model.parameters()), gpt_loader(tiny_cfg, 4, 2), device=device, precision=precision
        )
        state = engine.fit(epochs=1)
        dtypes[precision] = set(seen)
        assert state.step == 2
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_runs_with_a_grad_scaler_and_on_cpu_with_a_warning(tiny_cfg, device):
    model = GPTModel(tiny_cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            gpt_loader(tiny_cfg, 4, 2),
            device=device,
            precision="fp16",
        )
    said = [str(w.message) for w in caught if "precision='fp16' on CPU exercises the GradScaler path" in str(w.message)]
    assert len(said) == (1 if device == "cpu" else 0)  # the CPU is for testing; CUDA is fp16's home
    seen = []

    class Dtype:
        @hookimpl
        def after_backward(self, engine):
            seen.append(all(torch.isfinite(p.grad).all() for p in engine.model.parameters() if p.grad is not None))

    engine.register(Dtype())
    engine.fit()
    assert engine.state.step == 2 and seen == [True, True]
    assert isinstance(engine.scaler, torch.amp.GradScaler) and engine.scaler.get_scale() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_overflow_step_is_not_counted_and_never_reaches_after_backward(device):
    """A finite loss whose scaled gradients overflow: GradScaler skips the update; so does the engine."""
    from enginekit.plugins import LRWarmup

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on CPU says it is for testing
        engine = make_engine(
            [LRWarmup(warmup_steps=2, initial_lr=0.0)],
            steps_per_epoch=10,
            lr=1.0,
            precision="fp16",
            device=device,
            loss_fn=lambda out, targets: (out * 1e3).sum(),  # finite, with gradients near 4e4
        )
    # scaled by 2**115 those gradients overflow float32 (3.4e38) until the scaler has halved ~3 times
    engine.scaler = engine._precision.scaler = torch.amp.GradScaler(device, init_scale=2.0**115, growth_interval=1000)
    rec = HookRecorder(engine)
    grads_finite = []

    class Check:
        @hookimpl
        def after_backward(self, engine):
            grads_finite.append(all(torch.isfinite(p.grad).all() for p in engine.model.parameters()))

    engine.register(Check())
    engine.fit(max_steps=3)
    starts = [c.step for c in rec.calls if c.hook == "before_step"]
    assert len(starts) > 3 and starts[:2] == [0, 0]  # step 0 was tried again after the overflow
    assert [c.step for c in rec.calls if c.hook == "after_step"] == [0, 1, 2]
    assert grads_finite == [True, True, True]
    assert engine.state.step == 3 and engine.state.tokens_seen == 3 * 2 * 4  # only the steps taken
    assert rec.lrs == [0.0, 0.5, 1.0]  # the schedule did not move on for the dropped attempts
    assert engine.scaler.get_scale() < 2.0**115


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


def test_nonfinite_loss_error_policy_stops_before_the_update():
    losses = [1.0, 1.0, float("nan"), 1.0]
    engine = make_engine([], steps_per_epoch=4, losses=losses)
    rec = HookRecorder(engine)
    before = None

    class Snap:
        @hookimpl
        def after_step(self, engine, loss):
            nonlocal before
            before = [p.detach().clone() for p in engine.model.parameters()]

    engine.register(Snap())
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        engine.fit()
    assert rec.hooks[-2:] == ["before_step", "on_exception"]  # no after_backward, no update
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.state.step == 2


def test_nonfinite_loss_skip_policy_retries_the_step_with_the_next_batch():
    losses = {2: float("inf")}
    run = drive([], steps_per_epoch=5, losses=lambda step: losses.pop(step, 1.0), nonfinite="skip")
    # the batch of the skipped attempt is consumed: 5 batches give 4 steps, indices unbroken
    assert [s.step for s in run.steps] == [0, 1, 2, 3]
    assert run.hooks.count("before_step") == 5


def test_nonfinite_skip_gives_up_after_max_skips():
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        drive(
            [],
            steps_per_epoch=10,
            losses=lambda step: float("nan") if step >= 1 else 1.0,
            nonfinite="skip",
            max_skips=3,
        )


def test_signal_handlers_are_restored_after_fit():
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    inside = []

    class Look:
        @hookimpl
        def after_step(self, engine, loss):
            inside.append(signal.getsignal(signal.SIGTERM))

    drive(Look(), steps_per_epoch=2)
    assert inside[0] is not before[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_finishes_the_step_then_raises_training_interrupted():
    from enginekit import TrainingInterrupted

    class Kill:
        @hookimpl
        def after_backward(self, engine):
            if engine.state.step == 1:
                signal.raise_signal(signal.SIGTERM)

    engine = make_engine([Kill()], steps_per_epoch=5)
    rec = HookRecorder(engine)
    with pytest.raises(TrainingInterrupted) as info:
        engine.fit()
    assert info.value.code == 143 and info.value.exit_code == 143
    assert engine.state.step == 2  # step 1 finished
    assert rec.hooks[-5:] == ["after_backward", "after_step", "on_save_point", "on_save_point", "on_exception"]
    assert [c.kwargs["reason"] for c in rec.calls[-3:-1]] == ["step", "signal"]


def test_evaluate_restores_train_mode_and_averages_like_the_book(tiny_cfg):
    model = GPTModel(tiny_cfg)
    loader = gpt_loader(tiny_cfg, 6, 2)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, device="cpu")
    model.train()
    got = engine.evaluate(loader, max_batches=2)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = (
            sum(
                torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in list(loader)[:2]
            )
            / 2
        )
    assert got == expected


def test_a_second_fit_continues_a_cut_epoch_in_the_same_data_order(tiny_cfg):
    from enginekit.data import create_dataloader, load_verdict

    def run(splits):
        torch.manual_seed(0)
        model = GPTModel(tiny_cfg)
        loader = create_dataloader(load_verdict()[:1500], batch_size=2, max_length=16, stride=16, shuffle=True)
        seen = []

        class Inputs:
            @hookimpl
            def before_step(self, engine, batch):
                seen.append(batch[0][:, 0].tolist())

        engine = Engine(model, torch.optim.AdamW(model.parameters()), loader, plugins=[Inputs()], device="cpu")
        for max_steps in splits:
            engine.fit(max_steps=max_steps, epochs=2)
        return seen, model.out_head.weight.detach().clone(), engine.state

    whole, w_whole, st = run([14])
    parts, w_parts, st2 = run([5, 14])
    assert parts == whole and torch.equal(w_parts, w_whole)
    assert (st.step, st.epoch) == (st2.step, st2.epoch) == (14, 1)


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

    with pytest.raises(PluginError, match="plugin 'fails' failed in hook 'before_fit'"):
        drive([Wraps(), Fails()], steps_per_epoch=2)


def test_a_second_signal_aborts_at_once_even_during_set_up_or_resume_loading():
    class TwoTerms:
        @hookimpl
        def before_fit(self, engine):
            signal.raise_signal(signal.SIGTERM)  # deferred: remembered, the hook goes on
            signal.raise_signal(signal.SIGTERM)  # the second one aborts right here
            raise AssertionError("not reached")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        drive([TwoTerms()], steps_per_epoch=2)
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored after the abort too


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
