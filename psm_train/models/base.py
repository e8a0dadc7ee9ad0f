"""The contract every model of psm-train implements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from psm_train.distributed.sequence import SequenceParallel, slice_positions


class GenerationState(Protocol):
    """Online inference state of one model for a batch of B sequences."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume one token per sequence, tokens [B] int64; return next-token logits [B, V]."""

    def nbytes(self) -> int:
        """Bytes of tensors held by the state (what grows with context length)."""

    def describe(self) -> dict[str, int]:
        """Small summary for humans: e.g. tokens seen, roots held, state bytes."""


def require_dropout(p: float) -> None:
    """The ``dropout`` field of every model config."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: expected a number in [0, 1), got {p}")


class CausalLM(nn.Module):
    """A decoder: ``forward(tokens [B, T]) -> logits [B, T, V]``, logits[:, t] seeing tokens[:, :t+1].

    Under sequence parallelism (``sp`` given), ``tokens`` is this rank's slice of the sequence in
    the model's ``sequence_layout`` (see `psm_train.distributed.sequence`) and the logits are those
    of the slice's tokens, equal to the single-device logits at the same positions.

    A model implements `hidden` (the last layer's output) and owns ``norm`` and ``head``.
    """

    sequence_layout = "contiguous"
    norm: nn.Module
    head: nn.Linear

    def hidden(self, tokens: torch.Tensor, sp: SequenceParallel | None = None) -> torch.Tensor:
        """tokens [B, T] -> the last layer's output [B, T, d_model], before the final norm."""
        raise NotImplementedError

    def forward(
        self, tokens: torch.Tensor, sp: SequenceParallel | None = None, scored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V]; with ``scored`` (a bool [B, T] mask, or its ``nonzero(as_tuple=True)``)
        only those positions', [N, V] in row-major order.

        Sparse targets (MQAR's queries) then skip the vocabulary projection everywhere else.
        """
        h = self.hidden(tokens, sp)
        if scored is not None:
            h = h[scored]
        return self.head(self.norm(h))

    def check_sequence_parallel(self, seq_len: int, sp_size: int) -> None:
        """Raise ValueError, saying what to change, when seq_len cannot be split across sp_size ranks."""
        slice_positions(seq_len, 0, sp_size, self.sequence_layout)

    def init_generation(self, batch_size: int) -> GenerationState:
        raise NotImplementedError


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
