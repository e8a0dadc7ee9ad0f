"""One optimizer step's forward and backward passes, over its micro-batches."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from psm_train.labels import IGNORE_INDEX


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def forward_backward(engine, inputs: torch.Tensor, targets: torch.Tensor, *, grad_accum: int,
                     autocast: contextlib.AbstractContextManager, sparse_targets: bool,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate the gradients of this rank's rows (or slices) of one global batch; returns its share of
    the step's mean loss, a device scalar (no host sync).

    The loss is the sum of token losses over the scored tokens of the whole global batch (every rank,
    every micro-batch), so the gradients summed over ranks are the global batch's mean.
    """
    scored_total = all_sum((targets != IGNORE_INDEX).sum().to(torch.float32)).clamp_min(1)
    step_loss = torch.zeros((), device=inputs.device)
    micro = list(zip(inputs.chunk(grad_accum), targets.chunk(grad_accum)))
    for i, (micro_in, micro_tg) in enumerate(micro):
        # Finding the scored positions costs one device sync: worth it only where few are scored.
        scored = (micro_tg != IGNORE_INDEX).nonzero(as_tuple=True) if sparse_targets else None
        with autocast:
            loss = engine.forward(micro_in, positions=positions, targets=micro_tg, scored=scored)
        engine.backward(loss / scored_total, sync=i == len(micro) - 1)
        step_loss += loss.detach() / scored_total
    return step_loss
