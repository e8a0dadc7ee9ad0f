"""Sequence-parallel chunked affine scan: the carry crosses ranks in one all-gather per direction.

Each rank runs the chunked op on its slice from a zero state. That pass also yields the slice's
affine element (total log decay, final state): its summary. The summaries of all P ranks are
all-gathered in ONE collective (its backward is one collective too); rank r folds those of ranks
0..r-1 with the affine combine into its incoming state S_in, and corrects its outputs by the
term that S_in would have contributed:

    o_t += S_in^T (q_t ⊙ exp(b_t)),   b_t = cumulative log decay from the slice start through t,
    final state = exp(b_T) ▷ S_in + final state from zero.

Both are linear in S_in, so this equals running the slice from S_in (exact, not approximate),
and the backward pass through the all-gather is the reverse scan of the carries.
"""

from __future__ import annotations

import torch

from psm_train.distributed.collectives import all_gather_stack
from psm_train.distributed.sequence import SequenceParallel
from psm_train.graph_anchor import graph_anchor
from psm_train.kernels.chunk_affine import chunk_affine
from psm_train.scan.affine import apply


def exclusive_incoming_state(log_decays: torch.Tensor, states: torch.Tensor, rank: int) -> torch.Tensor:
    """The state entering slice ``rank``: the summaries of slices 0..rank-1 applied in order to zeros.

    log_decays: [P, B, H, K], states: [P, B, H, K, V] (every rank's summary).
    """
    incoming = torch.zeros_like(states[0]) + graph_anchor(states)
    for j in range(rank):
        incoming = apply(log_decays[j], states[j], incoming)
    return incoming


class SplitChunkAffine:
    """`chunk_affine` of this rank's slice of a sequence split across ``sp``: same signature, shapes and
    dtypes; the outputs and the final state are exact for the whole sequence. The slice starts where
    the previous rank's ends, so ``initial_state`` must be None."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def __call__(self, q, k, v, log_decay, *, chunk_size: int, initial_state=None, backend: str = "auto"):
        if not self.sp.active:
            return chunk_affine(q, k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state, backend=backend)
        if initial_state is not None:
            raise ValueError("a sequence split across ranks starts from the previous rank's state, not initial_state")
        sp = self.sp
        o, local_state = chunk_affine(q, k, v, log_decay, chunk_size=chunk_size, initial_state=None, backend=backend)
        acc = local_state.dtype
        with torch.autocast(q.device.type, enabled=False):
            cum = log_decay.to(acc).cumsum(1)  # [B, T, H, K | 1]
            total = cum[:, -1].expand(*local_state.shape[:-1])  # [B, H, K]
            # One message: the log decay rides along as an extra column of the state.
            summary = torch.cat((total.unsqueeze(-1), local_state), dim=-1)
            gathered = all_gather_stack(summary, sp.group, sp.rank, sp.size)
            incoming = exclusive_incoming_state(gathered[..., 0], gathered[..., 1:], sp.rank)
            correction = torch.einsum("bthk,bhkv->bthv", q.to(acc) * cum.exp(), incoming)
            final_state = apply(total, local_state, incoming)
        return (o.to(acc) + correction).to(o.dtype), final_state
