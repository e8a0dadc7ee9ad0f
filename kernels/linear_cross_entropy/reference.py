"""Plain PyTorch reference of `linear_cross_entropy`: the full logits, then F.cross_entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum of the cross-entropy of softmax(hidden @ weight[:vocab_size]ᵀ) over rows not ignored.

    hidden [N, d], weight [V_pad, d], targets [N]. The logits are built whole ([N, V_pad]) and the
    padded columns sliced away; the log-softmax runs in float32 (float64 for float64 inputs).
    """
    logits = F.linear(hidden, weight)[:, :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
