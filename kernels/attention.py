"""Scaled dot-product attention behind one backend selector.

flash-attn is used when it is importable, the tensors are on a GPU and in fp16/bf16; otherwise
PyTorch SDPA (which picks its own fused kernel on GPU and the math path on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention_backend(q: torch.Tensor) -> str:
    """Name of the backend `attention` uses for tensors like ``q``."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash_attn"
    return "sdpa"


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
    if attention_backend(q) == "flash_attn":
        out = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=causal,
            window_size=(-1, -1) if window is None else (window - 1, 0),
        )
        return out.transpose(1, 2)
    if not causal or (t_q == 1 and (window is None or t_k <= window)):
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = causal_mask(t_q, t_k, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
