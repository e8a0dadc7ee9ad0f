"""World = data-parallel (dp) x sequence-parallel (sp) ranks, SP groups made of contiguous ranks.

Contiguous SP groups keep the carry exchange inside a node on GPU clusters (ranks are numbered
node by node). Rank r has sp_rank = r % sp and dp_rank = r // sp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from psm_train.distributed.sequence import SequenceParallel


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    sp: int

    def __post_init__(self):
        if self.sp <= 0 or self.world_size % self.sp:
            raise ValueError(
                f"parallel.sp = {self.sp} does not divide the world size {self.world_size}: "
                f"choose sp among the divisors of {self.world_size}, or launch a multiple of {self.sp} processes"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    def sp_group_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.sp, (dp_rank + 1) * self.sp))

    def sequence_parallel(self) -> SequenceParallel | None:
        """This rank's SP group (None when sp = 1). Collective: every rank must call it, in the same order."""
        if self.sp == 1:
            return None
        mine = None
        for dp_rank in range(self.dp):  # new_group must be entered by all ranks for every group
            group = dist.new_group(self.sp_group_ranks(dp_rank))
            if dp_rank == self.dp_rank:
                mine = group
        return SequenceParallel(mine, self.sp_rank, self.sp)
