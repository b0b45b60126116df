"""enginekit: a small event-driven trainer for GPT-style models, extended with pluggy plugins.

Public API: this package's names (``Engine``, ``hookimpl``, ``TrainState``, ``Metrics``, the
errors) and the modules ``enginekit.plugins`` (built-in plugins), ``enginekit.testing`` (the
plugin test kit), ``enginekit.gpt`` (the book's model), ``enginekit.data`` (tokenizer, loaders,
corpus), ``enginekit.hookspec`` (the hooks, documented), ``enginekit.plugin_api`` (setting checks,
atomic writes, the run lock, ``lr_preview``) and ``enginekit.log`` (enginekit's loggers). Other
modules are implementation::

    from enginekit import Engine, hookimpl, TrainState
    from enginekit.plugins import LRWarmup, CosineDecay, GradClip, LossTracker, EarlyStopping, ...
"""

from .engine import Engine, NonFiniteLossError, TrainingInterrupted, lm_loss
from .errors import TrainingAborted
from .hookspec import hookimpl
from .metrics import Metrics
from .registry import PluginFailure, describe_error, plugin_failure
from .state import TrainState

__all__ = [
    "Engine",
    "Metrics",
    "NonFiniteLossError",
    "PluginFailure",
    "TrainState",
    "TrainingAborted",
    "TrainingInterrupted",
    "describe_error",
    "hookimpl",
    "lm_loss",
    "plugin_failure",
]
__version__ = "0.1.0"
