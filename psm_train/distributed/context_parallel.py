"""Context parallelism for softmax attention: all-gather of K/V over the zigzag layout.

Each rank holds two pieces of the sequence (zigzag: pieces r and 2P-1-r of 2P), so that causal
work is balanced. K and V of all ranks come in one all-gather (one reduce in the backward pass);
each local piece then attends to the global keys before its end, with the usual bottom-right
causal alignment, which places the piece's queries at their true global positions.
"""

from __future__ import annotations

import torch

from psm_train.distributed.collectives import all_gather_stack
from psm_train.distributed.sequence import SequenceParallel
from psm_train.kernels.attention import attention


class ContextParallelAttention:
    """The ``attend`` op of a causal attention layer whose input is this rank's zigzag slice:
    q, k, v [B, H, 2n, D] local -> [B, H, 2n, D]."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, q, k, v, *, causal: bool, window: int | None = None) -> torch.Tensor:
        sp = self.sp
        if not sp.active:
            return attention(q, k, v, causal=causal, window=window)
        if not causal or q.shape[2] != k.shape[2]:
            raise ValueError("context parallelism supports causal self-attention over the slice only (no KV cache)")
        n = q.shape[2] // 2
        p = sp.size
        kv = all_gather_stack(torch.stack((k, v)), sp.group, sp.rank, sp.size)  # [P, 2, B, H, 2n, D]
        # Global piece order: rank j's first half is piece j, its second half piece 2P-1-j.
        pieces = list(kv[..., :n, :].unbind(0)) + list(kv[..., n:, :].unbind(0))[::-1]
        full_k, full_v = torch.cat(pieces, dim=-2).unbind(0)  # [B, H, T, D]
        out = []
        for half, piece in ((0, sp.rank), (1, 2 * p - 1 - sp.rank)):
            end = (piece + 1) * n
            qh = q[:, :, half * n : (half + 1) * n]
            out.append(attention(qh, full_k[:, :, :end], full_v[:, :, :end], causal=True, window=window))
        return torch.cat(out, dim=2)
