"""enginekit's built-in plugins, one per module, each with its formula as a pure function."""

from .checkpoint import Checkpoint, CheckpointError, CheckpointWriteError
from .cosine_decay import CosineDecay, cosine_lr
from .early_stopping import EarlyStopping
from .grad_clip import GradClip
from .loss_tracker import LossTracker, plot_lrs
from .lr_warmup import LRWarmup, warmup_lr
from .progress_bar import ProgressBar
from .sample_text import SampleText
from .tensorboard import TensorBoard

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "CosineDecay",
    "EarlyStopping",
    "GradClip",
    "LRWarmup",
    "LossTracker",
    "ProgressBar",
    "SampleText",
    "TensorBoard",
    "cosine_lr",
    "plot_lrs",
    "warmup_lr",
]
