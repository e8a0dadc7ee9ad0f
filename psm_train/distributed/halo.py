"""The halo exchange: the last inputs of the previous rank's slice (a short causal convolution's)."""

from __future__ import annotations

import torch

from psm_train.distributed.collectives import all_gather_stack
from psm_train.distributed.sequence import SequenceParallel
from psm_train.graph_anchor import graph_anchor


class PreviousRankTail:
    """``previous_tail(x, width)`` of a sequence split across ``sp``: the last ``width`` positions of the
    previous rank's x [B, T, ...], zeros on rank 0 (None while ``sp`` is inactive: x starts the sequence).
    One all-gather of the tails."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, x: torch.Tensor, width: int) -> torch.Tensor | None:
        sp = self.sp
        if not sp.active:
            return None
        if x.shape[1] < width:
            raise ValueError(f"each rank's slice ({x.shape[1]} tokens) must be at least the conv width - 1 ({width})")
        tails = all_gather_stack(x[:, x.shape[1] - width :], sp.group, sp.rank, sp.size)
        return torch.zeros_like(tails[0]) + graph_anchor(tails) if sp.rank == 0 else tails[sp.rank - 1]
