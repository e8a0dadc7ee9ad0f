"""Training and evaluation batches from a synthetic task, as a pure function of (seed, step).

Because batch k depends only on (seed, k), resuming at step k needs no loader state at all.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch


class SyntheticTask(Protocol):
    vocab_size: int

    def train_seq_len(self, step: int) -> int: ...

    def eval_seq_lens(self) -> list[int]: ...

    def make_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values; independent streams for (seed, "train", step) etc."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SyntheticSource:
    def __init__(self, task: SyntheticTask, seed: int):
        self.task = task
        self.seed = seed
        self.vocab_size = task.vocab_size

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, T] int64, of training step ``step``."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "train", step))
        return self.task.make_batch(batch_size, self.task.train_seq_len(step), generator)

    def eval_sets(self, batches: int, batch_size: int) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A fixed held-out set per evaluation length: {seq_len: [(inputs, targets), ...]}."""
        sets = {}
        for seq_len in self.task.eval_seq_lens():
            sets[seq_len] = [
                self.task.make_batch(batch_size, seq_len, torch.Generator().manual_seed(derived_seed(self.seed, "eval", seq_len, i)))
                for i in range(batches)
            ]
        return sets
