"""The contract every model of psm-train implements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class GenerationState(Protocol):
    """Online inference state of one model for a batch of B sequences."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume one token per sequence, tokens [B] int64; return next-token logits [B, V]."""

    def nbytes(self) -> int:
        """Bytes of tensors held by the state (what grows with context length)."""

    def describe(self) -> dict[str, int]:
        """Small summary for humans: e.g. tokens seen, roots held, state bytes."""


class CausalLM(nn.Module):
    """A decoder: ``forward(tokens [B, T]) -> logits [B, T, V]``, logits[:, t] seeing tokens[:, :t+1]."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_generation(self, batch_size: int) -> GenerationState:
        raise NotImplementedError


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
