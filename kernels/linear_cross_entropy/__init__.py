"""Cross-entropy of a linear head without storing the logits.

Functional API. Shapes: hidden [N, d] (the rows the head scores), weight [V_pad, d] (the head,
possibly padded past the vocabulary), targets [N] (int64 class ids, or ``ignore_index``).
"""

from __future__ import annotations

import torch

from psm_train.kernels.linear_cross_entropy.fused import LinearCrossEntropy
from psm_train.kernels.linear_cross_entropy.reference import linear_cross_entropy_ref

# Rows per chunk: the chunk's logits and their gradient take 2 · chunk_rows · V_pad elements of the
# compute dtype (1.6 GB in bf16 at 8192 rows and a 50k vocabulary; the CPU path also holds them in
# float32), while every GEMM keeps thousands of rows and d weight is accumulated only a few times.
DEFAULT_CHUNK_ROWS = 8192


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Sum over rows whose target is not ``ignore_index`` of cross_entropy(hidden @ weightᵀ, target).

    hidden [N, d]; weight [V_pad, d]; targets [N] int64, each in [0, vocab_size) or ignore_index
    (not checked: that would need a host sync). vocab_size (default V_pad): the real vocabulary;
    the logits of the padding columns >= vocab_size are left out of the softmax and get no gradient.
    chunk_rows: rows whose logits exist at once.

    Returns the summed loss, a scalar in float32 (float64 for float64 inputs); divide by the number
    of scored rows for the mean. Under torch.autocast the matmuls run in the autocast dtype, the
    softmax in float32. The gradients are computed in the forward (see `fused`); the function is
    differentiable once, with respect to hidden and weight. Matches `linear_cross_entropy_ref`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [N, d] and weight [V_pad, d], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(
            f"linear_cross_entropy: expected int64 targets of shape ({hidden.shape[0]},), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    v_pad = weight.shape[0]
    vocab_size = v_pad if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_pad:
        raise ValueError(f"linear_cross_entropy: vocab_size must be in [1, {v_pad}] (weight rows), got {vocab_size}")
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be positive, got {chunk_rows}")
    grad_enabled = torch.is_grad_enabled()
    return LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        vocab_size,
        ignore_index,
        chunk_rows,
        _compute_dtype(hidden, weight),
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )


__all__ = ["DEFAULT_CHUNK_ROWS", "linear_cross_entropy", "linear_cross_entropy_ref"]
