"""A sequence-parallel group, and how a sequence is cut into the slices its ranks hold.

Two layouts:
- contiguous: rank r holds tokens [r·T/P, (r+1)·T/P). The PSMs use it, so that the carry flows
  rank to rank in order and a rank's chunks form an aligned block of the scan tree.
- zigzag: the sequence is cut into 2P pieces; rank r holds pieces r and 2P-1-r. Under causal
  attention every rank then has the same amount of work (the transformer baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass
class SequenceParallel:
    """The SP group this rank belongs to: ``rank`` of ``size`` ranks (torch.distributed group ``group``).

    The sequence-parallel ops (context-parallel attention, the cross-rank tree and affine carry, the
    halo exchange) hold this object. While ``active`` is False they run their single-device op on
    the whole sequence (an evaluation length that cannot be split, see `psm_train.parallelize`).
    """

    group: object
    rank: int
    size: int
    active: bool = True


def slice_positions(seq_len: int, rank: int, size: int, layout: str) -> torch.Tensor:
    """Global positions [seq_len / size] of the tokens that ``rank`` holds, in local order."""
    if layout == "contiguous":
        if seq_len % size:
            raise ValueError(f"sequence length {seq_len} is not divisible by parallel.sp = {size}")
        n = seq_len // size
        return torch.arange(rank * n, (rank + 1) * n)
    if layout == "zigzag":
        if seq_len % (2 * size):
            raise ValueError(
                f"sequence length {seq_len} is not divisible by 2 * parallel.sp = {2 * size} "
                "(the transformer's zigzag layout gives every rank two pieces)"
            )
        n = seq_len // (2 * size)
        mirror = 2 * size - 1 - rank
        return torch.cat((torch.arange(rank * n, (rank + 1) * n), torch.arange(mirror * n, (mirror + 1) * n)))
    raise ValueError(f"unknown sequence layout {layout!r} (known: {', '.join(LAYOUTS)})")


def shard_sequence(x: torch.Tensor, sp: SequenceParallel | None, layout: str) -> torch.Tensor:
    """This rank's slice of x [B, T, ...] along dim 1 (x itself without sequence parallelism)."""
    if sp is None:
        return x
    return x[:, slice_positions(x.shape[1], sp.rank, sp.size, layout).to(x.device)]


def unshard_sequence(slices: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Inverse of shard_sequence: the full [B, T, ...] from every rank's slice, in rank order."""
    size = len(slices)
    seq_len = sum(s.shape[1] for s in slices)
    out = slices[0].new_empty((slices[0].shape[0], seq_len, *slices[0].shape[2:]))
    for rank, part in enumerate(slices):
        out[:, slice_positions(seq_len, rank, size, layout).to(out.device)] = part
    return out
