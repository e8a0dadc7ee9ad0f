"""Loss and accuracy on scored positions (targets != IGNORE_INDEX), per evaluation length.

With several ranks every rank takes part: the held-out batches are dealt out over the
data-parallel ranks, and a sequence is split across its sequence-parallel group when the model
allows that length to be split (otherwise each rank of the group runs it whole and one counts it).
The sums are then added over the world, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from psm_train.data.synthetic import IGNORE_INDEX
from psm_train.distributed.layout import ParallelLayout
from psm_train.distributed.sequence import SequenceParallel, slice_positions


def _splits(model: nn.Module, seq_len: int, sp: SequenceParallel | None) -> bool:
    if sp is None:
        return False
    try:
        model.check_sequence_parallel(seq_len, sp.size)
    except ValueError:
        return False
    return True


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_sets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    layout: ParallelLayout | None = None,
    sp: SequenceParallel | None = None,
    class_groups: torch.Tensor | None = None,
) -> dict[int, dict]:
    """{seq_len: {"loss", "ppl", "acc", "scored", "acc_by_position"}} over each fixed held-out set.

    acc_by_position[t] is the accuracy at position t over the scored targets there (None where
    no target is scored), the curve a length-generalisation plot needs. ``layout`` and ``sp``
    (this rank's place in a multi-rank run) make it collective: every rank must call it.
    ``class_groups`` [V] maps each class to a coarser group (S_n: the permutation's sign); with it
    "group_acc" and "group_acc_by_position" count a prediction right when its group is the target's.
    """
    dp_rank, dp = (layout.dp_rank, layout.dp) if layout is not None else (0, 1)
    groups = class_groups.to(device) if class_groups is not None else None
    was_training = model.training
    model.eval()
    results = {}
    for seq_len, batches in eval_sets.items():
        split = _splits(model, seq_len, sp)
        positions = torch.arange(seq_len)
        if split:
            positions = slice_positions(seq_len, sp.rank, sp.size, model.sequence_layout)
        # summed on the device and copied once per length (the labels' boolean index syncs anyway)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, scored, group correct
        # per position this rank holds: correct, scored, group correct
        local = torch.zeros(3, len(positions), dtype=torch.long, device=device)
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each);
        # a rank left without a batch of its own repeats the last one without counting it.
        for first in range(0, len(batches), dp):
            index = first + dp_rank
            counted = index < len(batches) and (split or sp is None or sp.rank == 0)
            inputs, targets = batches[min(index, len(batches) - 1)]
            inputs, targets = inputs[:, positions].to(device), targets[:, positions].to(device)
            mask = targets != IGNORE_INDEX
            with autocast or contextlib.nullcontext():
                logits = model(inputs, sp=sp if split else None, scored=mask)  # [N, V]: scored positions only
            if not counted:
                continue
            labels = targets[mask]
            predicted = logits.argmax(-1)
            hits = predicted == labels
            group_hits = hits if groups is None else groups[predicted] == groups[labels]
            scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(scores, labels, reduction="sum")
            sums += torch.stack([x.double() for x in (loss, hits.sum(), mask.sum(), group_hits.sum())])
            for row, flags in ((0, hits), (2, group_hits)):  # back to [batch, position], zeros where not scored
                local[row] += torch.zeros_like(targets).masked_scatter_(mask, flags.long()).sum(0)
            local[1] += mask.sum(0)
        sums = sums.cpu()
        per_position = torch.zeros(3, seq_len, dtype=torch.long)
        per_position[:, positions] = local.cpu()
        if layout is not None and layout.world_size > 1:
            backend_device = device if dist.get_backend() == dist.Backend.NCCL else torch.device("cpu")
            for t in (sums, per_position):
                reduced = t.to(backend_device)
                dist.all_reduce(reduced)
                t.copy_(reduced.cpu())
        loss_sum, correct, scored, group_correct = sums.tolist()
        correct_at, scored_at, group_correct_at = per_position.tolist()
        loss = loss_sum / max(scored, 1)
        results[seq_len] = {
            "loss": loss,
            "ppl": math.exp(loss) if loss < 700 else math.inf,  # perplexity; meaningful when every token is scored
            "acc": correct / max(scored, 1),
            "scored": int(scored),
            "acc_by_position": [c / s if s else None for c, s in zip(correct_at, scored_at)],
        }
        if class_groups is not None:
            results[seq_len]["group_acc"] = group_correct / max(scored, 1)
            results[seq_len]["group_acc_by_position"] = [c / s if s else None for c, s in zip(group_correct_at, scored_at)]
    model.train(was_training)
    return results


def write_eval_json(path: Path, results: dict[int, dict]) -> None:
    """``evaluate``'s results as a run's eval.json (lengths as string keys)."""
    path.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
