"""Loss and accuracy on scored positions (targets != IGNORE_INDEX), per evaluation length."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.data.synthetic import IGNORE_INDEX


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions. logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_sets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[int, dict]:
    """{seq_len: {"loss", "ppl", "acc", "scored", "acc_by_position"}} over each fixed held-out set.

    acc_by_position[t] is the accuracy at position t over the scored targets there (None where
    no target is scored), the curve a length-generalisation plot needs.
    """
    was_training = model.training
    model.eval()
    results = {}
    for seq_len, batches in eval_sets.items():
        loss_sum, correct_sum, scored = 0.0, 0, 0
        pos_correct = torch.zeros(seq_len, dtype=torch.long)
        pos_scored = torch.zeros(seq_len, dtype=torch.long)
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(inputs)
            mask = targets != IGNORE_INDEX
            n = int(mask.sum())
            loss_sum += float(masked_loss(logits, targets)) * n
            hits = (logits.argmax(-1) == targets) & mask
            correct_sum += int(hits.sum())
            scored += n
            pos_correct += hits.sum(0).cpu()
            pos_scored += mask.sum(0).cpu()
        loss = loss_sum / max(scored, 1)
        results[seq_len] = {
            "loss": loss,
            "ppl": math.exp(loss) if loss < 700 else math.inf,  # perplexity; meaningful when every token is scored
            "acc": correct_sum / max(scored, 1),
            "scored": scored,
            "acc_by_position": [c / s if s else None for c, s in zip(pos_correct.tolist(), pos_scored.tolist())],
        }
    model.train(was_training)
    return results
