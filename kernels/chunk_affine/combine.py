"""The affine combine of PSM.md section 2, written once.

An affine element (E, f) maps a state S to E ▷ S + f. Here E is a diagonal decay over the key
dimension stored as its logarithm ``log_decay`` [..., K] (or [..., 1] for a scalar decay, which
broadcasts), and f a state [..., K, V]. With the older element first:

    combine((E_a, f_a), (E_b, f_b)) = (E_b ∘ E_a, f_b + E_b ▷ f_a),   identity (log 0 = 0, f = 0)

The PyTorch chunked form (`reference.chunk_affine_ref`) carries the state across chunks with
`apply`, and the sequence-parallel exchange uses it to carry a state across ranks. The Triton
kernels do not call it: `triton_kernels.state_fwd` computes the same map inline in its loop over
chunks (S ← e^{b_C} ⊙ S + local), checked against the reference by the tests.
"""

from __future__ import annotations

import torch


def combine(
    log_decay_a: torch.Tensor, state_a: torch.Tensor, log_decay_b: torch.Tensor, state_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose the older affine element a with the newer b.

    log_decay_*: [..., K] or [..., 1]; state_*: [..., K, V]. Returns (log_decay, state).
    """
    return log_decay_a + log_decay_b, state_b + log_decay_b.exp().unsqueeze(-1) * state_a


def apply(log_decay: torch.Tensor, state: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """The element (E, f) applied to an incoming state S: E ▷ S + f. Shapes as in ``combine``."""
    return state + log_decay.exp().unsqueeze(-1) * incoming
