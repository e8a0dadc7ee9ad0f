"""The affine recurrence S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (PSM.md §2).

Functional API. Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log decay g [B, T, H, K] (diagonal,
GLA) or [B, T, H, 1] (one scalar per head: Mamba2, RetNet, linear attention); state [B, H, K, V].
o_t includes token t; q carries any scaling. Half-precision inputs accumulate in float32.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from psm_train.kernels.chunk_affine.reference import affine_step, chunk_affine_ref, recurrent_affine_ref

# Triton is a GPU dependency; the kernels import on first use, so CPU runs never load them.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("auto", "triton", "reference")
MAX_TRITON_DIM = 256  # K and V tiles are held whole in the kernels


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """'triton' or 'reference' for ``backend`` on tensors like q (and v).

    auto: Triton for CUDA tensors in fp32/bf16/fp16 with head dims up to 256 when Triton imports,
    else the reference.
    triton: forced; on CPU tensors only under TRITON_INTERPRET=1 (the CPU tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    dims = (q.shape[-1],) if v is None else (q.shape[-1], v.shape[-1])
    usable = HAVE_TRITON and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and max(dims) <= MAX_TRITON_DIM
    if backend == "auto":
        return "triton" if usable and q.is_cuda else "reference"
    if not usable:
        raise RuntimeError(
            f"kernel backend 'triton' needs the triton package, fp32/bf16/fp16 inputs and head dims up to "
            f"{MAX_TRITON_DIM} (got {q.dtype}, dims {dims})"
        )
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return backend


def chunk_affine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise parallel form, for training and prefill.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [B, T, H, K] or [B, T, H, 1];
    initial_state: [B, H, K, V] or None (zeros). Returns o [B, T, H, V] (v's dtype) and the
    final state [B, H, K, V] (float32, or float64 for float64 inputs).
    chunk_size: the chunk length of the reference path. Every chunk length computes the same
    function (only rounding differs), so the Triton path takes it as a hint only
    (`triton_op.kernel_chunk`): scalar decay runs with chunk_size rounded up to a power of two and
    clamped to [16, 128]; diagonal decay always runs with chunks of 64 (sub-chunks of 16), which
    its tiles are built for.
    backend: 'auto', 'triton' or 'reference' (see `resolve_backend`); both give the same function
    and the same carry, so callers (the sequence-parallel exchange) need not know which ran.
    """
    if resolve_backend(backend, q, v) == "triton":
        from psm_train.kernels.chunk_affine.triton_op import chunk_affine_triton

        return chunk_affine_triton(q, k, v, log_decay, chunk_size=chunk_size, initial_state=initial_state)
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


__all__ = ["BACKENDS", "affine_step", "chunk_affine", "recurrent_affine", "resolve_backend"]
