"""The data-source interface of the trainer, and the synthetic-task source.

A source yields, for each training step, this data-parallel rank's rows of the step's global
batch. Every rank of one sequence-parallel group has the same dp_rank and so receives the same
sequences; the trainer cuts its slice. Resuming at step k must yield exactly what an
uninterrupted run yields from step k on, for any dp_size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch

from psm_train.data.synthetic import RecallDistance

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each [rows, T] int64


class DataSource(Protocol):
    vocab_size: int
    # True when most targets are IGNORE_INDEX (MQAR scores only its queries): the trainer then
    # computes logits at the scored positions alone instead of over the whole vocabulary everywhere.
    sparse_targets: bool
    # [vocab_size] int64: a coarser labelling the evaluation also scores (S_n: each permutation's sign), or None.
    class_groups: torch.Tensor | None
    # MQAR: how to find each query's key, so that the evaluation also scores queries by their chunk distance to it.
    recall_distance: RecallDistance | None

    def train_batches(self, start_step: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
        """Batches of steps start_step, start_step + 1, ...: rows [dp_rank * b, (dp_rank + 1) * b) of
        each global batch, b = global_batch_size // dp_size."""
        ...

    def cursor(self, step: int, global_batch_size: int) -> dict:
        """The small, world-size-independent position of the stream before ``step`` (for checkpoints)."""
        ...

    def eval_sets(self, batches: int, batch_size: int) -> dict[int, list[Batch]]:
        """A fixed held-out set per evaluation length: {seq_len: [(inputs, targets), ...]}."""
        ...


class SyntheticTask(Protocol):
    vocab_size: int
    sparse_targets: bool

    def train_seq_len(self, step: int) -> int: ...

    def eval_seq_lens(self) -> list[int]: ...

    def make_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values; independent streams for (seed, "train", step) etc."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SyntheticSource:
    """Batch k is a pure function of (seed, k): resuming needs no loader state at all."""

    def __init__(self, task: SyntheticTask, seed: int):
        self.task = task
        self.seed = seed
        self.vocab_size = task.vocab_size
        self.sparse_targets = task.sparse_targets
        self.class_groups = getattr(task, "class_groups", None)  # S_n's signs; None for the other tasks
        self.recall_distance = getattr(task, "recall_distance", None)  # MQAR's; None for the other tasks

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, T] int64, of training step ``step``."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "train", step))
        return self.task.make_batch(batch_size, self.task.train_seq_len(step), generator)

    def train_batches(self, start_step: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
        rows = global_batch_size // dp_size
        step = start_step
        while True:
            inputs, targets = self.train_batch(step, global_batch_size)
            yield inputs[dp_rank * rows:(dp_rank + 1) * rows], targets[dp_rank * rows:(dp_rank + 1) * rows]
            step += 1

    def cursor(self, step: int, global_batch_size: int) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "step": step}

    def eval_sets(self, batches: int, batch_size: int) -> dict[int, list[Batch]]:
        sets = {}
        for seq_len in self.task.eval_seq_lens():
            sets[seq_len] = [
                self.task.make_batch(batch_size, seq_len, torch.Generator().manual_seed(derived_seed(self.seed, "eval", seq_len, i)))
                for i in range(batches)
            ]
        return sets
