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

from psm_train.distributed.layout import ParallelLayout
from psm_train.data.synthetic import DEFAULT_DISTANCE_CHUNK, DISTANCES, RecallDistance, distance_buckets
from psm_train.labels import IGNORE_INDEX
from psm_train.parallelize import SequenceSharding


EVAL_LOGITS = 2**30  # logits of one forward; a batch of more rows is evaluated a few rows at a time


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_sets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    layout: ParallelLayout | None = None,
    sharding: SequenceSharding | None = None,
    class_groups: torch.Tensor | None = None,
    recall_distance: RecallDistance | None = None,
) -> dict[int, dict]:
    """{seq_len: {"loss", "ppl", "acc", "scored", "acc_by_position"}} over each fixed held-out set.

    acc_by_position[t] is the accuracy at position t over the scored targets there (None where
    no target is scored), the curve a length-generalisation plot needs. ``layout`` and ``sharding``
    (this rank's place in a multi-rank run, from `psm_train.parallelize`) make it collective: every
    rank must call it.
    ``class_groups`` [V] maps each class to a coarser group (S_n: the permutation's sign); with it
    "group_acc" and "group_acc_by_position" count a prediction right when its group is the target's.
    ``recall_distance`` (MQAR) adds "acc_by_distance" and "scored_by_distance" ({"same", "1", ">=2"}:
    the query in its key's chunk, one chunk or two and more after it), the "distance_chunk" used, and
    the accuracies as flat "acc_d0", "acc_d1", "acc_d2+" where any query is scored.
    """
    dp_rank, dp = (layout.dp_rank, layout.dp) if layout is not None else (0, 1)
    groups = class_groups.to(device) if class_groups is not None else None
    chunk = distance_chunk(model, recall_distance) if recall_distance is not None else 0
    was_training = model.training
    model.eval()
    results = {}
    sharding = sharding or SequenceSharding(None)
    sp = sharding.sp
    vocab = getattr(model, "vocab_size", None)
    for seq_len, batches in eval_sets.items():
        if vocab:  # at most about EVAL_LOGITS logits at once: a batch of long sequences would not fit
            rows = max(1, EVAL_LOGITS // (seq_len * vocab))
            batches = [(x[i : i + rows], y[i : i + rows]) for x, y in batches for i in range(0, len(x), rows)]
        split = sharding.splits(seq_len)
        positions = sharding.positions(seq_len) if split else torch.arange(seq_len)
        # summed on the device and copied once per length (the labels' boolean index syncs anyway)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, scored, group correct
        # per position this rank holds: correct, scored, group correct
        local = torch.zeros(3, len(positions), dtype=torch.long, device=device)
        by_distance = torch.zeros(2, len(DISTANCES), dtype=torch.long, device=device)  # correct, scored
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each);
        # a rank left without a batch of its own repeats the last one without counting it.
        for first in range(0, len(batches), dp):
            index = first + dp_rank
            counted = index < len(batches) and (split or sp is None or sp.rank == 0)
            inputs, targets = batches[min(index, len(batches) - 1)]
            if recall_distance is not None:  # from whole sequences: a key may lie in another rank's slice
                bucket = distance_buckets(recall_distance.key_positions(inputs, targets), chunk)[:, positions].to(device)
            inputs, targets = inputs[:, positions].to(device), targets[:, positions].to(device)
            mask = targets != IGNORE_INDEX
            with autocast or contextlib.nullcontext(), contextlib.nullcontext() if split else sharding.whole_sequences():
                # [N, V]: the scored positions only
                logits = model(inputs, positions=positions.to(device) if split else None, scored=mask)
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
            if recall_distance is not None:
                by_distance[0].index_add_(0, bucket[mask], hits.long())
                by_distance[1] += torch.bincount(bucket[mask], minlength=len(DISTANCES))
        sums = sums.cpu()
        per_position = torch.zeros(3, seq_len, dtype=torch.long)
        per_position[:, positions] = local.cpu()
        by_distance = by_distance.cpu()
        if layout is not None and layout.world_size > 1:
            backend_device = device if dist.get_backend() == dist.Backend.NCCL else torch.device("cpu")
            for t in (sums, per_position, by_distance):
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
        if recall_distance is not None:
            results[seq_len]["distance_chunk"] = chunk
            results[seq_len]["acc_by_distance"] = {k: c / s if s else None for k, c, s in zip(DISTANCES, *by_distance.tolist())}
            results[seq_len]["scored_by_distance"] = dict(zip(DISTANCES, by_distance[1].tolist()))
            results[seq_len].update(distance_metrics(results[seq_len]))  # flat, for metrics.jsonl
    model.train(was_training)
    return results


def distance_chunk(model: nn.Module, recall: RecallDistance) -> int:
    """The chunk that measures a query's distance to its key: the task's, else the model's chunk_size, else 64."""
    return recall.chunk or getattr(getattr(model, "cfg", None), "chunk_size", None) or DEFAULT_DISTANCE_CHUNK


def distance_metrics(result: dict) -> dict[str, float]:
    """One length's acc_by_distance as flat metric names: acc_d0 (same chunk), acc_d1, acc_d2+ (where scored)."""
    names = dict(zip(DISTANCES, ("acc_d0", "acc_d1", "acc_d2+")))
    return {names[k]: v for k, v in result.get("acc_by_distance", {}).items() if v is not None}


def write_eval_json(path: Path, results: dict[int, dict]) -> None:
    """``evaluate``'s results as a run's eval.json (lengths as string keys)."""
    path.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
