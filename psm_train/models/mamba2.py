"""Mamba2's SSD mixer (Dao & Gu 2024, arXiv 2405.21060), as in mamba_ssm's Mamba2 with one group.

    z, x, B, C, dt = in_proj(u)                   x: d_inner = expand·d, B, C: d_state, dt: one per head
    x, B, C = silu(causal_conv1d([x, B, C]))      depthwise, width conv_width
    dt = softplus(dt + dt_bias),  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T,  y_t = h_t^T C_t + D x_t     per head, h [d_state, head_dim]
    out = out_proj(RMSNorm(y · silu(z)))

i.e. the affine recurrence with k = B, v = dt·x, q = C (B and C shared by all heads) and a scalar
log decay dt·A per head. The head count is derived: n_heads = expand·d_model / head_dim, and the
inherited ``n_heads`` field is left unset (None) or must equal it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.models.affine_lm import AffineLM, AffineLMConfig, AffineMixer, AffineOp, MixerState, require_positive
from psm_train.models.layers import RMSNorm

DT_RANGE = (1e-3, 0.1)  # softplus(dt_bias) at init, log-uniform
A_RANGE = (1.0, 16.0)  # -A at init, uniform


@dataclass
class Mamba2Config(AffineLMConfig):
    n_heads: int | None = None  # derived: expand * d_model / head_dim; if given it must agree
    expand: int = 2
    head_dim: int = 64
    d_state: int = 64
    conv_width: int = 4

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def validate(self) -> None:
        super().validate()
        require_positive(self, "expand", "head_dim", "d_state", "conv_width")
        if self.d_inner % self.head_dim:
            raise ValueError(f"head_dim: expected a divisor of expand * d_model ({self.d_inner}), got {self.head_dim}")
        heads = self.d_inner // self.head_dim
        if self.n_heads is not None and self.n_heads != heads:
            raise ValueError(f"n_heads: expected null or expand * d_model / head_dim = {heads}, got {self.n_heads}")


class Mamba2Mixer(AffineMixer):
    def __init__(self, cfg: Mamba2Config):
        n_heads = cfg.d_inner // cfg.head_dim
        super().__init__(cfg, n_heads, cfg.d_state, cfg.head_dim)
        self.d_inner = cfg.d_inner
        self.conv_dim = cfg.d_inner + 2 * cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + self.conv_dim + n_heads, bias=False)
        # No padding: the causal left context comes from the cache (zeros at the sequence start).
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_width, groups=self.conv_dim)
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(DT_RANGE[0]), math.log(DT_RANGE[1])))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(*A_RANGE).log())
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = RMSNorm(cfg.d_inner, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def causal_conv(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise causal conv of x [B, T, C] after the cached inputs [B, C, W-1] (None: zeros).

        Returns y [B, T, C] and the new cache, the last W-1 inputs; with T = 1 this is the
        recurrent step.
        """
        x = x.transpose(1, 2)
        width = self.conv.kernel_size[0]
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], width - 1)
        x = torch.cat((cache, x), dim=-1)
        return self.conv(x).transpose(1, 2), x[..., x.shape[-1] - (width - 1) :]

    def mix(self, x: torch.Tensor, state: MixerState | None, op: AffineOp) -> tuple[torch.Tensor, MixerState]:
        b, t, _ = x.shape
        h, n, p = self.n_heads, self.head_k_dim, self.head_v_dim
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, h], dim=-1)
        xbc, conv = self.causal_conv(xbc, None if state is None else state.conv)
        xs, B, C = F.silu(xbc).split([self.d_inner, n, n], dim=-1)
        xs = xs.view(b, t, h, p)
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        log_decay = (dt * -self.A_log.exp())[..., None]  # [B, T, H, 1]
        q, k = C[:, :, None].expand(b, t, h, n), B[:, :, None].expand(b, t, h, n)
        y, s = op(q, k, xs * dt[..., None], log_decay, None if state is None else state.state)
        y = y + self.D[:, None] * xs
        y = self.norm(y.reshape(b, t, -1) * F.silu(z))
        return self.o_proj(y), MixerState(s, conv)

    def entry_state(self, x: torch.Tensor) -> MixerState | None:
        """The conv cache x starts with: the conv inputs of the W-1 tokens before x, if any."""
        tail = self.previous_tail(x, self.conv.kernel_size[0] - 1)
        if tail is None:
            return None
        _, xbc, _ = self.in_proj(tail).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        return MixerState(None, xbc.transpose(1, 2))

    def init_state(self, batch_size: int) -> MixerState:
        state = super().init_state(batch_size)
        state.conv = self.conv.weight.new_zeros(batch_size, self.conv_dim, self.conv.kernel_size[0] - 1)
        return state


class Mamba2(AffineLM):
    mixer_cls = Mamba2Mixer
