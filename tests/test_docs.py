"""The README and the pages under docs/ are run, so the docs stay true to the code.

Every ```python block of a page runs in one namespace per page, top to bottom; a block that
needs a long run is shrunk by a replacement that must match (never skipped), and every
``test_*`` function a page defines is called.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)

# Pages under docs/ that another change owns; linked already, written there.
PENDING: set[str] = set()

# Shrinks the long runs: (text in the block, what runs instead). Each must match.
SMALLER_CONCEPTS = [
    ("GPTModel(GPT_CONFIG_124M)", "GPTModel({**GPT_CONFIG_124M, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 1})"),
    ("engine.fit(epochs=15)", "engine.fit(epochs=2)"),
]
ADAPT = {"README.md": SMALLER_CONCEPTS}


def text_of(page: Path) -> str:
    return page.read_text()


def blocks(page: Path, language: str = "python") -> list[str]:
    return [textwrap.dedent(m.group(3)) for m in FENCE.finditer(text_of(page)) if m.group(2) == language]


def plugins_page_setup() -> dict:
    """What the plugin page's Engine(...) line names: a stand-in model, optimizer and loader."""
    from enginekit import Engine
    from enginekit.plugins import LRWarmup
    from enginekit.testing import make_engine

    stand_in = make_engine([])
    return {
        "Engine": Engine,
        "LRWarmup": LRWarmup,
        "model": stand_in.model,
        "optimizer": stand_in.optimizer,
        "train_loader": stand_in.train_loader,
    }


SETUP = {"docs/plugins.md": plugins_page_setup}


def run_page(page: Path) -> dict:
    name = page.relative_to(ROOT).as_posix()
    namespace: dict = SETUP[name]() if name in SETUP else {}
    code = "\n".join(blocks(page))
    for old, new in ADAPT.get(name, []):
        assert old in code, f"{name}: the test shrinks {old!r}, which the page no longer has"
        code = code.replace(old, new)
    exec(compile(code, name, "exec"), namespace)
    for key, value in list(namespace.items()):
        if key.startswith("test_") and callable(value):
            value()
    return namespace


# README.md and docs/plugins.md have tests of their own below, which run them and check more
OWN_TEST = {README, ROOT / "docs" / "plugins.md"}


def test_every_python_block_of_the_other_pages_runs():
    for page in PAGES:
        if page not in OWN_TEST:
            run_page(page)


def test_readme_runs_top_to_bottom(capsys):
    code = "\n".join(blocks(README))
    assert "GPTModel(GPT_CONFIG_124M)" in code and "engine.fit(epochs=15)" in code
    namespace = run_page(README)
    # the concepts example, on a smaller model
    engine = namespace["engine"]
    assert engine.state.step == 18 and engine.state.total_steps == 18
    assert "Ep 1 (Iter 000000)" in capsys.readouterr().out
    # the plugin author's example stops the run
    from enginekit.testing import drive

    run = drive(namespace["StopAtLoss"](threshold=1e9, every=3), steps_per_epoch=10)
    assert run.engine.state.step == 3
    # the isolation example is a test of its own, called by run_page
    assert callable(namespace["test_warmup_then_cosine_in_either_order"])


def test_the_plugin_page_holds_the_evaluation_reaction_and_its_test():
    namespace = run_page(ROOT / "docs" / "plugins.md")
    assert "HalveLROnPlateau" in namespace
    namespace["test_halves_after_two_evaluations_without_progress_under_a_schedule"]()
    assert isinstance(namespace["engine"], namespace["Engine"])  # the entry-point example built one


def test_every_code_block_names_its_language():
    for page in PAGES:
        bare = [m.start() for m in FENCE.finditer(text_of(page)) if not m.group(2)]
        assert not bare, f"{page.name}: a ``` block without a language (python, bash, text, toml)"


def test_scripts_named_in_bash_blocks_exist():
    for page in PAGES:
        for block in blocks(page, "bash"):
            for path in re.findall(r"\b((?:examples|benchmarks)/[\w/.-]+\.(?:py|sh))", block):
                assert (ROOT / path).is_file(), f"{page.name}: {path} does not exist"


def test_local_links_point_at_files_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text_of(page)):
            path = (page.parent / target).resolve().relative_to(ROOT).as_posix()
            assert path in PENDING or (ROOT / path).is_file(), f"{page.name} links to {target}, which is missing"


def test_the_readme_is_a_front_door():
    assert len(text_of(README).splitlines()) <= 300


def test_documented_exit_codes_match_the_example():
    from enginekit import TrainingInterrupted

    text = " ".join(text_of(ROOT / "docs" / "cli.md").split())  # the page wraps lines
    assert "`130` after SIGINT" in text and "`143` after SIGTERM" in text
    assert TrainingInterrupted(2, 0).code == 130 and TrainingInterrupted(15, 0).code == 143
    example = (ROOT / "examples" / "pretrain_verdict.py").read_text()
    assert "return 3" in example and "`3` non-finite loss" in text
    assert "return 4" in example and "`4` a checkpoint could not be written" in text


def test_the_two_commands_are_the_makefiles_and_ci_runs_the_test_one():
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text_of(README), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun: $(VENV)/.installed\n" in makefile and "\ntest: $(VENV)/.installed\n" in makefile
    recipe = makefile.split("\ntest: $(VENV)/.installed\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in recipe.splitlines()] == ["$(BIN)/ruff", "$(BIN)/mypy", "$(BIN)/python"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_the_cli_page_names_every_flag_of_the_example():
    example = (ROOT / "examples" / "pretrain_verdict.py").read_text()
    flags = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", example))
    page = text_of(ROOT / "docs" / "cli.md")
    assert len(flags) > 20 and sorted(f for f in flags if f"`{f}" not in page) == []
