"""The README's code is run, so the front door stays true."""

from __future__ import annotations

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def python_block_after(heading: str) -> str:
    section = README[README.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_plugin_isolation_example_runs_and_passes():
    namespace: dict = {}
    exec(python_block_after("### Testing a plugin in isolation"), namespace)
    namespace["test_warmup_then_cosine_in_either_order"]()


def test_plugin_author_example_stops_the_run():
    namespace: dict = {}
    exec(python_block_after("## Writing a plugin"), namespace)
    from enginekit.testing import drive

    run = drive(namespace["StopAtLoss"](threshold=1e9, every=3), steps_per_epoch=10)
    assert run.engine.state.step == 3


def test_documented_exit_codes_match_the_example():
    from enginekit import TrainingInterrupted

    text = " ".join(README.split())  # the README wraps lines
    assert "`130` after SIGINT" in text and "`143` after SIGTERM" in text
    assert TrainingInterrupted(2, 0).code == 130 and TrainingInterrupted(15, 0).code == 143
    example = (ROOT / "examples" / "pretrain_verdict.py").read_text()
    assert "return 3" in example and "`3` non-finite loss" in text
    assert "return 4" in example and "`4` a checkpoint could not be written" in text


def test_concepts_example_runs_with_a_smaller_model(capsys):
    code = python_block_after("## Concepts")
    assert "GPTModel(GPT_CONFIG_124M)" in code and "engine.fit(epochs=15)" in code
    code = code.replace(
        "GPTModel(GPT_CONFIG_124M)", "GPTModel({**GPT_CONFIG_124M, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 1})"
    )
    code = code.replace("engine.fit(epochs=15)", "engine.fit(epochs=2)")
    namespace: dict = {}
    exec(code, namespace)
    engine = namespace["engine"]
    assert engine.state.step == 18 and engine.state.total_steps == 18
    assert "Ep 1 (Iter 000000)" in capsys.readouterr().out


def test_evaluation_reaction_example_passes_its_own_test():
    namespace: dict = {}
    exec(python_block_after("### Reacting to evaluations"), namespace)
    namespace["test_halves_after_two_evaluations_without_progress_under_a_schedule"]()


def test_the_two_commands_are_the_makefiles_and_ci_runs_the_test_one():
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun: $(VENV)/.installed\n" in makefile and "\ntest: $(VENV)/.installed\n" in makefile
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"
