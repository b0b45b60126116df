"""Checkpointing machinery under the :class:`~enginekit.plugins.Checkpoint` plugin.

One backend for one process, DDP and FSDP: ``torch.distributed.checkpoint`` (DCP) writes the
model and optimizer tensors, each rank its own shards, and reshards them on load; enginekit's
promises sit on top:

- :mod:`.format`: a checkpoint folder's layout, its manifest (the sha256 of every file, written
  last and atomically: the commit marker) and the checks against hostile files;
- :mod:`.dcp`: the DCP backend (hashing while writing, verifying while reading, safe loading);
- :mod:`.storage`: the checkpoints of a folder, choosing the newest good one, pruning;
- :mod:`.settings`: what a resumed run must share with the run that wrote the checkpoint;
- :mod:`.saving`: one save, foreground or through ``async_save``, agreed by every rank and committed;
- :mod:`.loading`: opening the newest good checkpoint, the refusals, loading it into a run;
- :mod:`.consolidate`: a checkpoint to one book-compatible ``model.pt``.
"""

from .consolidate import consolidate
from .format import CheckpointError, CheckpointWriteError, Manifest, read_manifest, verify_files
from .settings import check_same_model, run_settings
from .storage import Folder

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Folder",
    "Manifest",
    "check_same_model",
    "consolidate",
    "read_manifest",
    "run_settings",
    "verify_files",
]
