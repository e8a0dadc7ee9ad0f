"""Checkpoint storage: one file per rank plus a manifest, written in the background, published atomically.

This layer knows nothing about models, optimizers or DeepSpeed: the trainer hands every rank's
``CheckpointStore.save`` a dict of tensors and plain values, and gets the same dicts back from
``CheckpointStore.load(...).read(rank)``. See ``store.py`` for the on-disk layout and why a crash
at any point leaves a loadable checkpoint.
"""

from psm_train.checkpoint.store import CheckpointError, CheckpointStore, CheckpointWriteError, StoredCheckpoint

__all__ = ["CheckpointError", "CheckpointStore", "CheckpointWriteError", "StoredCheckpoint"]
