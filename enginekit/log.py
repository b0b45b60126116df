"""enginekit's messages through the standard ``logging`` module.

Every module logs to ``logging.getLogger("enginekit.<module>")``; ``Engine.print`` (the lines
plugins show their users) logs to ``enginekit.print``. The ``enginekit`` logger comes with one
handler, which writes each line with ``tqdm.write`` so it lands above a progress bar instead of
through it, and only on rank 0 under torchrun. Records also propagate to the root logger, so
pytest's ``caplog`` and your own handlers see them. With the standard library alone::

    logging.getLogger("enginekit").setLevel(logging.WARNING)           # silence the info lines
    logging.getLogger("enginekit").handlers[:] = [logging.FileHandler("train.log")]  # redirect
    logging.getLogger("enginekit").removeHandler(enginekit.log.HANDLER)  # only your root config
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["HANDLER", "RankZeroFilter", "TqdmHandler", "get_logger"]

ROOT_NAME = "enginekit"


def _rank() -> int:
    """This process's rank: torch.distributed's once a group is up, else torchrun's ``RANK``."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Lets records through on rank 0 only, so N processes print a line once, not N times."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0


class TqdmHandler(logging.Handler):
    """Writes each record with ``tqdm.write``: a live progress bar is cleared, the line printed,
    the bar redrawn. The stream is looked up at each write (``sys.stdout`` unless given), so
    output captured by replacing ``sys.stdout`` (pytest's ``capsys``, Jupyter) is captured here too."""

    def __init__(self, stream: object | None = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


#: the handler the ``enginekit`` logger comes with; remove it to leave output to your own config
HANDLER = TqdmHandler()
HANDLER.setFormatter(logging.Formatter("%(message)s"))
HANDLER.addFilter(RankZeroFilter())


_configured = False


def _root() -> logging.Logger:
    """The ``enginekit`` logger, given its level and handler once: a handler you removed stays removed."""
    global _configured
    root = logging.getLogger(ROOT_NAME)
    if not _configured:
        _configured = True
        if root.level == logging.NOTSET:  # a level you set before importing enginekit wins
            root.setLevel(logging.INFO)
        root.addHandler(HANDLER)
    return root


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` under ``enginekit``, filtered to rank 0 before it propagates."""
    _root()
    if name != ROOT_NAME and not name.startswith(ROOT_NAME + "."):
        name = f"{ROOT_NAME}.{name}"
    logger = logging.getLogger(name)
    if not any(isinstance(f, RankZeroFilter) for f in logger.filters):
        logger.addFilter(RankZeroFilter())
    return logger
