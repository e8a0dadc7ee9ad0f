"""The contract every model of psm-train implements.

Models are single-device code. Sequence parallelism enters through the ops they call (attention,
the prefix scan, the chunked affine recurrence), which `psm_train.parallelize` replaces on an
unmodified model; a model never branches on it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from psm_train.kernels.linear_cross_entropy import linear_cross_entropy
from psm_train.labels import IGNORE_INDEX

# Embedding and head rows are padded to a multiple of this: a vocabulary such as GPT-2's 50257 would
# otherwise keep cuBLAS off its fastest matrix kernels for the largest GEMMs of a small model.
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class GenerationState(Protocol):
    """Online inference state of one model for a batch of B sequences."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume one token per sequence, tokens [B] int64; return next-token logits [B, V]."""

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume tokens [B, n] (n >= 1) of a fresh state through the parallel form; return the logits
        after the last one, [B, V]. The state then equals the one n calls of `step` leave."""

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

    A model implements `hidden` (the last layer's output) and builds its embedding and head with
    `init_vocab`: both hold `padded_vocab(vocab_size)` rows, the padded logits are never returned
    and never scored.
    """

    vocab_size: int
    embed: nn.Embedding
    norm: nn.Module
    head: nn.Linear

    def init_vocab(self, vocab_size: int, d_model: int) -> None:
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(padded_vocab(vocab_size), d_model)
        self.head = nn.Linear(d_model, padded_vocab(vocab_size), bias=False)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the last layer's output [B, T, d_model], before the final norm.

        positions [T]: the tokens' positions in their sequence (default 0..T-1), for a model that
        encodes absolute positions and is handed a slice of a longer sequence.
        """
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [..., vocab_size] of hidden states [..., d_model]."""
        return self.head(self.norm(h))[..., : self.vocab_size]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        scored: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; or, with ``targets`` [B, T], the summed cross-entropy (fp32) of every
        position whose target is not IGNORE_INDEX.

        ``scored`` (a bool [B, T] mask or its ``nonzero(as_tuple=True)``) keeps only those positions:
        logits [N, V] in row-major order, or their loss. Sparse targets (MQAR's queries) then skip
        the vocabulary projection everywhere else. The loss never materialises the [N, V] logits.
        """
        h = self.hidden(tokens, positions)
        if scored is not None:
            h = h[scored]
            targets = targets[scored] if targets is not None else None
        if targets is None:
            return self.logits(h)
        return linear_cross_entropy(
            self.norm(h).reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1),
            vocab_size=self.vocab_size, ignore_index=IGNORE_INDEX,
        )

    def init_generation(self, batch_size: int) -> GenerationState:
        raise NotImplementedError


def check_fresh(seen: int, tokens: torch.Tensor) -> None:
    """prefill's preconditions: a state that has seen no token, and tokens [B, n] with n >= 1."""
    if seen:
        raise ValueError(f"prefill needs a fresh generation state; this one has seen {seen} tokens")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill expects tokens [B, n] with n >= 1, got {tuple(tokens.shape)}")


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
