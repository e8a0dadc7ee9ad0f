"""The affine recurrence S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (PSM.md §2).

Functional API. Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log decay g [B, T, H, K] (diagonal,
GLA) or [B, T, H, 1] (one scalar per head: Mamba2, RetNet, linear attention); state [B, H, K, V].
o_t includes token t; q carries any scaling. Half-precision inputs accumulate in float32.
"""

from __future__ import annotations

import torch

from psm_train.kernels.chunk_affine.reference import affine_step, chunk_affine_ref, recurrent_affine_ref


def chunk_affine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise parallel form, for training and prefill.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [B, T, H, K] or [B, T, H, 1];
    initial_state: [B, H, K, V] or None (zeros). Returns o [B, T, H, V] (v's dtype) and the
    final state [B, H, K, V] (float32, or float64 for float64 inputs).
    Runs the PyTorch reference; a Triton kernel will be dispatched from here.
    """
    return chunk_affine_ref(q, k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state)


def recurrent_affine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form; same shapes and dtypes as `chunk_affine`."""
    return recurrent_affine_ref(q, k, v, log_decay, initial_state=initial_state)


__all__ = ["affine_step", "chunk_affine", "recurrent_affine"]
