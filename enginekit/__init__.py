"""enginekit: a small event-driven trainer for GPT-style models, extended with pluggy plugins.

Public API (everything else is an implementation detail)::

    from enginekit import Engine, hookimpl, TrainState
    from enginekit.plugins import LRWarmup, CosineDecay, GradClip, LossTracker, ...
"""

from .engine import Engine, NonFiniteLossError, TrainingInterrupted, lm_loss
from .hookspec import hookimpl
from .metrics import Metrics
from .registry import PluginError, PluginValueError
from .state import TrainState

__all__ = [
    "Engine",
    "Metrics",
    "NonFiniteLossError",
    "PluginError",
    "PluginValueError",
    "TrainState",
    "TrainingInterrupted",
    "hookimpl",
    "lm_loss",
]
__version__ = "0.1.0"
