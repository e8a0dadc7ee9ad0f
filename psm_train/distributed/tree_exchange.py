"""Sequence-parallel prefix scan along the fixed Blelloch tree, for non-associative aggregators.

Rank r holds chunks [r·m, (r+1)·m) with m a power of two: an aligned block, hence one subtree of
the single-device tree. Its upsweep is local. The P subtree roots are the nodes of the tree's level
log2(m); everything above them is the tree over the P roots. After ONE all-gather of the roots,
every rank evaluates that tree's prefixes (`prefix_scan` over the P roots: a prefix depends only on
the aligned blocks before it, so this is the same parenthesisation), and the local downsweep from
the prefix of root r finishes the exact single-device tree.

Every rank calls Agg equally often, forward and backward (ZeRO-3 gathers a module's parameters
collectively at every call): the top of the tree is evaluated whole on every rank, and rank 0,
whose downsweep skips the identity's Agg call at its top level, makes that call on a placeholder
whose result is only anchored in the graph (an exact zero). Rank r's copy of the top only feeds
rank r's outputs (the rest is anchored likewise), so summing gradients over ranks counts each use
exactly once; the all-gather's backward returns the gradient of each root to the rank that owns it.
"""

from __future__ import annotations

import torch

from psm_train.distributed.collectives import all_gather_stack
from psm_train.distributed.sequence import SequenceParallel
from psm_train.graph_anchor import graph_anchor
from psm_train.scan.tree import Aggregator, downsweep, prefix_scan, upsweep


def check_tree_slices(n_chunks_local: int, sp_size: int) -> None:
    """The block each rank holds must be an aligned power-of-two subtree of the global tree."""
    if n_chunks_local <= 0 or n_chunks_local & (n_chunks_local - 1):
        raise ValueError(
            f"each of the parallel.sp = {sp_size} ranks holds {n_chunks_local} chunks; the tree exchange needs a "
            "power of two (1, 2, 4, ...) so that every rank's block is a subtree of the scan tree: choose "
            "seq_len = sp * chunk_size * 2^k"
        )


class SplitPrefixScan:
    """`prefix_scan(x, agg)` of this rank's chunks x [B, m, *S] of a sequence split across ``sp``.

    Returns (prefixes [B, m, *S], first_has_prefix) exactly as the single-device scan gives them for
    these chunks: only rank 0's first chunk has the identity as its prefix.
    """

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, x: torch.Tensor, agg: Aggregator) -> tuple[torch.Tensor, bool]:
        sp = self.sp
        if not sp.active:
            return prefix_scan(x, agg)
        n = x.shape[1]
        check_tree_slices(n, sp.size)
        blocks = upsweep(x, agg)
        roots = all_gather_stack(blocks[-1][:, 0], sp.group, sp.rank, sp.size).transpose(0, 1)  # [B, P, *S]
        root_prefixes, _ = prefix_scan(roots, agg)
        anchor = graph_anchor(root_prefixes)
        if sp.rank > 0:
            return downsweep(blocks, n, agg, root_prefixes[:, sp.rank]) + anchor, True
        prefixes = downsweep(blocks, n, agg)
        if n > 1:  # the call a rooted downsweep makes at its top level, for the identity's right child
            half = blocks[-2][:, :1]
            anchor = anchor + graph_anchor(agg(torch.zeros_like(half[:, 0]), half[:, 0]))
        return prefixes + anchor, False
