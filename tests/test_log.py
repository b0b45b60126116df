"""enginekit's lines go through ``logging``: capturable, silenceable, redirectable, rank 0 only,
and written above a tqdm bar."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from enginekit import hookimpl
from enginekit.log import HANDLER, TqdmHandler, get_logger
from enginekit.testing import drive


class Says:
    @hookimpl
    def after_step(self, engine):
        engine.print(f"step {engine.state.step} done")


@pytest.fixture
def enginekit_logger():
    """The ``enginekit`` logger, restored after the test whatever it changed."""
    logger = logging.getLogger("enginekit")
    level, handlers = logger.level, logger.handlers[:]
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_engine_print_is_an_info_record_of_enginekit_print(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="enginekit"):
        drive(Says(), steps_per_epoch=2)
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name == "enginekit.print"]
    assert lines == [("enginekit.print", logging.INFO, "step 0 done"), ("enginekit.print", logging.INFO, "step 1 done")]
    assert capsys.readouterr().out == "step 0 done\nstep 1 done\n"  # the default handler still shows them


def test_a_level_silences_them(enginekit_logger, capsys):
    enginekit_logger.setLevel(logging.WARNING)
    drive(Says(), steps_per_epoch=2)
    assert capsys.readouterr().out == ""


def test_handlers_redirect_them(enginekit_logger, capsys):
    sink = io.StringIO()
    enginekit_logger.handlers[:] = [logging.StreamHandler(sink)]
    drive(Says(), steps_per_epoch=1)
    assert sink.getvalue() == "step 0 done\n" and capsys.readouterr().out == ""


def test_only_rank_zero_logs(monkeypatch, caplog, capsys):
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="enginekit"):
        get_logger("enginekit.test").info("from rank 1")
    assert caplog.records == [] and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.INFO, logger="enginekit"):
        get_logger("enginekit.test").info("from rank 0")
    assert [r.getMessage() for r in caplog.records] == ["from rank 0"]
    assert capsys.readouterr().out == "from rank 0\n"


def test_get_logger_names_everything_under_enginekit():
    assert get_logger("mine").name == "enginekit.mine"
    assert get_logger("enginekit.plugins.x").name == "enginekit.plugins.x"
    assert HANDLER in logging.getLogger("enginekit").handlers


def test_a_line_lands_above_a_live_bar_not_through_it():
    out = io.StringIO()
    bar = tqdm(total=10, file=out, ascii=True, bar_format="{n}/{total}")
    bar.update(3)
    handler = TqdmHandler(stream=out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.LogRecord("enginekit.x", logging.INFO, __file__, 1, "hello", None, None))
    bar.close()
    text = out.getvalue()
    before, after = text.split("hello\n")
    assert before.endswith("\r") and "3/10" in after  # the bar was cleared, the line written, the bar redrawn
