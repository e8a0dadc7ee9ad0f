"""Gated Linear Attention (Yang et al. 2024, arXiv 2312.06635), as in flash-linear-attention's GLA layer.

Per head, S_t = Diag(α_t) S_{t-1} + k_t v_t^T and o_t = S_t^T q_t, with a data-dependent gate over
the key dim from a low-rank projection: log α_t = logsigmoid(W_up W_down x_t + b) / τ, where the
normaliser τ (16) keeps the decay close to 1 at init. q, k have expand_k·d channels, v expand_v·d;
q is scaled by K^-0.5. The output is RMS-normalised per head, gated by silu(W_g x_t) and
projected back to d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.models.affine_lm import (
    AffineLM,
    AffineLMConfig,
    AffineMixer,
    AffineOp,
    MixerState,
    require_head_split,
    require_positive,
)
from psm_train.models.layers import RMSNorm


@dataclass
class GLAConfig(AffineLMConfig):
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0

    @property
    def key_dim(self) -> int:
        return int(self.d_model * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.d_model * self.expand_v)

    def validate(self) -> None:
        super().validate()
        require_positive(self, "expand_k", "expand_v", "gate_low_rank_dim", "gate_logit_normalizer")
        require_head_split(self.n_heads, key_dim=self.key_dim, value_dim=self.value_dim)


class GLAMixer(AffineMixer):
    def __init__(self, cfg: GLAConfig):
        super().__init__(cfg, cfg.n_heads, cfg.key_dim // cfg.n_heads, cfg.value_dim // cfg.n_heads)
        d = cfg.d_model
        self.q_proj = nn.Linear(d, cfg.key_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.key_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.g_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d, cfg.gate_low_rank_dim, bias=False), nn.Linear(cfg.gate_low_rank_dim, cfg.key_dim, bias=True)
        )
        self.o_norm = RMSNorm(self.head_v_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.value_dim, d, bias=False)
        self.gate_logit_normalizer = cfg.gate_logit_normalizer

    def mix(self, x: torch.Tensor, state: MixerState | None, op: AffineOp) -> tuple[torch.Tensor, MixerState]:
        b, t, _ = x.shape
        h = self.n_heads
        q = self.q_proj(x).view(b, t, h, -1) * self.head_k_dim**-0.5
        k = self.k_proj(x).view(b, t, h, -1)
        v = self.v_proj(x).view(b, t, h, -1)
        log_decay = F.logsigmoid(self.gk_proj(x)).view(b, t, h, -1) / self.gate_logit_normalizer
        o, s = op(q, k, v, log_decay, None if state is None else state.state)
        o = self.o_norm(o).reshape(b, t, -1) * F.silu(self.g_proj(x))
        return self.o_proj(o), MixerState(s)


class GLA(AffineLM):
    mixer_cls = GLAMixer
