"""Building blocks shared by the models: norms, rotary positions, gated MLP, attention blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.kernels.attention import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of a SwiGLU with about the parameters of a ``mlp_ratio`` GELU MLP, rounded to 8."""
    return max(8, int(round(mlp_ratio * dim * 2 / 3 / 8)) * 8)


Rope = tuple[torch.Tensor, torch.Tensor]


def rotary(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Rope:
    """cos, sin of shape [T, head_dim // 2] for integer ``positions`` [T].

    A model computes the table once per forward and hands it to every block: computed inside a
    compiled block, inductor fused the float64 cos/sin into the rotation itself and evaluated them
    for every element of q and k.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x [..., T, D] by the angles of cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class KVCache:
    """Keys and values [B, H, S, D] of the positions seen so far (the last ``window`` if set)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    window: int | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return everything the new queries may attend to."""
        if self.k is not None:
            k = torch.cat((self.k, k), dim=2)
            v = torch.cat((self.v, v), dim=2)
        # A later query at position t needs keys (t - window, t]: the last window - 1 seen so far.
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
        self.k, self.v = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
        return k, v

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions.

    ``attend`` is the attention op, `psm_train.kernels.attention.attention` by default; the
    parallelize step replaces it by context-parallel attention when a sequence is split across ranks.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.head_dim} must be even for rotary positions")
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.attend = attention

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        *,
        causal: bool,
        window: int | None = None,
        cache: KVCache | None = None,
        only_last: int | None = None,
    ) -> torch.Tensor:
        """x: [B, T, dim]; rope: the `rotary` table of x's positions. Returns [B, T, dim].

        With ``only_last`` m, only the last m positions query (keys and values come from all T):
        returns [B, m, dim], the same as the full result's last m rows.
        """
        b, t, _ = x.shape
        cos, sin = rope
        if only_last is None:
            q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q = apply_rotary(q, cos, sin)
        else:
            if cache is not None or not 0 < only_last <= t:
                raise ValueError(f"only_last must be in 1..{t} and used without a KV cache")
            # Reading qkv's weight outside its forward is fine under ZeRO-3: DeepSpeed gathers such a parameter on
            # access and registers it with the running module (its ZeROOrderedDict).
            w_q, w_kv = self.qkv.weight.split((self.qkv.in_features, 2 * self.qkv.in_features))
            q = F.linear(x[:, t - only_last :], w_q).view(b, only_last, self.n_heads, self.head_dim).transpose(1, 2)
            k, v = F.linear(x, w_kv).view(b, t, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q = apply_rotary(q, cos[t - only_last :], sin[t - only_last :])
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = self.attend(q, k, v, causal=causal, window=window)
        return self.out(y.transpose(1, 2).reshape(b, q.shape[2], -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, norm_eps: float, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = SelfAttention(dim, n_heads)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.drop = nn.Dropout(dropout)  # p = 0 returns its input unchanged and draws no random numbers

    def forward(self, x, rope, *, causal, window=None, cache=None, only_last=None):
        """``only_last`` m: the output of the last m positions only, [B, m, dim]; it skips their queries' and the
        MLP's work on the other positions (a model's last block, when it keeps only part of its window)."""
        h = self.attn(self.attn_norm(x), rope, causal=causal, window=window, cache=cache, only_last=only_last)
        if only_last is not None:
            x = x[:, x.shape[1] - only_last :]
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.mlp_norm(x)))


RESIDUAL_OUTPUTS = ("out", "down", "o_proj")


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2 L)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layers) if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else 1.0
            nn.init.normal_(module.weight, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
