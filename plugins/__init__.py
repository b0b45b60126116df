"""enginekit's built-in plugins, one per module, each with its formula as a pure function."""

from .best_checkpoint import BestCheckpoint
from .checkpoint import Checkpoint, CheckpointError, CheckpointWriteError
from .cosine_decay import CosineDecay, cosine_lr
from .early_stopping import EarlyStopping
from .grad_clip import GradClip
from .loss_tracker import LossTracker, plot_lrs
from .lr_scheduler import LRScheduler
from .lr_warmup import LRWarmup, warmup_lr
from .progress_bar import ProgressBar
from .reduce_lr_on_plateau import ReduceLROnPlateau, plateau_better
from .sample_text import SampleText
from .tensorboard import TensorBoard

__all__ = [
    "BestCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "CosineDecay",
    "EarlyStopping",
    "GradClip",
    "LRScheduler",
    "LRWarmup",
    "LossTracker",
    "ProgressBar",
    "ReduceLROnPlateau",
    "SampleText",
    "TensorBoard",
    "cosine_lr",
    "plateau_better",
    "plot_lrs",
    "warmup_lr",
]
