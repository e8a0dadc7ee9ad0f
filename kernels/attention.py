"""Scaled dot-product attention behind one backend selector.

The order is chosen by measurement (`tools/bench_attention.py`; the current table is in
docs/benchmarks.md), for causal calls (transformer, Inf) and the batched bidirectional 2c-token
Agg calls alike: on GPU, SDPA's cuDNN kernel was the fastest at every shape measured, ahead of its
flash kernel, and flash-attn 2 (not installable on the GPU image) is published near SDPA's flash
kernel on Hopper. So fp16/bf16 attention without a window goes to SDPA with cuDNN first (then
flash, memory-efficient, math: SDPA takes the first that accepts the inputs). A sliding window
needs an explicit mask in SDPA, so windows go to flash-attn when it is installed. On CPU SDPA runs
its math path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# Fastest first, as measured (module docstring).
SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention_backend(q: torch.Tensor, window: int | None = None) -> str:
    """Name of the backend `attention` uses for tensors like ``q``: flash_attn, sdpa_cudnn_first or sdpa."""
    fused = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if fused and window is not None and flash_attn_func is not None:
        return "flash_attn"
    return "sdpa_cudnn_first" if fused else "sdpa"


# Decoding with a KV cache (fewer queries than keys) changes the key length at every step. SDPA's
# cuDNN kernel builds an execution plan per new shape, which made per-token decoding slow at every
# context length (tools/bench_generation.py), so those calls try flash first.
SDPA_DECODE_PRIORITY = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def _sdpa_context(q: torch.Tensor, k: torch.Tensor):
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        priority = SDPA_PRIORITY if q.shape[-2] == k.shape[-2] else SDPA_DECODE_PRIORITY
        return sdpa_kernel(priority, set_priority=True)
    return contextlib.nullcontext()


def causal_mask(t_q: int, t_k: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [t_q, t_k], True where attention is allowed.

    Bottom-right aligned: query i sits at absolute position t_k - t_q + i, so a block of new
    queries appended after a KV cache sees the whole cache. ``window`` W keeps keys in (pos - W, pos].
    """
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """Multi-head attention.

    q: [B, H, Tq, D], k and v: [B, H, Tk, D] with Tk >= Tq. With ``causal`` the queries are the
    last Tq positions of the Tk keys (bottom-right alignment); ``window`` limits each query to its
    last ``window`` keys (itself included). Returns [B, H, Tq, D].
    """
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if attention_backend(q, window) == "flash_attn":
        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            window_size=(-1, -1) if window is None else (window - 1, 0),
        )
        return out.transpose(1, 2)
    with _sdpa_context(q, k):
        if not causal or (t_q == 1 and (window is None or t_k <= window)):
            return F.scaled_dot_product_attention(q, k, v)
        if t_q == t_k and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = causal_mask(t_q, t_k, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
