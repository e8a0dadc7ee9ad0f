"""RetNet's multi-scale retention (Sun et al. 2023, arXiv 2307.08621), as in flash-linear-attention.

Per head h, S_t = γ_h S_{t-1} + k_t v_t^T and o_t = S_t^T q_t with fixed decays
γ_h = 1 - 2^(-5-h), so the heads look back over different ranges. q is scaled by K^-0.5; the
output is RMS-normalised per head (the paper's GroupNorm), gated by swish(W_g x_t) and projected
back to d_model. Keys have d_model channels, values expand_v·d_model (2, as in the paper).
No xPos (the paper's rotation of q and k): position enters only through the decay.
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
class RetNetConfig(AffineLMConfig):
    expand_v: float = 2.0

    @property
    def value_dim(self) -> int:
        return int(self.d_model * self.expand_v)

    def validate(self) -> None:
        super().validate()
        require_positive(self, "expand_v")
        require_head_split(self.n_heads, key_dim=self.d_model, value_dim=self.value_dim)


class RetNetMixer(AffineMixer):
    def __init__(self, cfg: RetNetConfig):
        super().__init__(cfg, cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.value_dim // cfg.n_heads)
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.g_proj = nn.Linear(d, cfg.value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(cfg.value_dim, d, bias=False)

    def log_gamma(self, like: torch.Tensor) -> torch.Tensor:
        """log γ_h [H], a fixed function of the config: computed in float64 and rounded once to the
        dtype of the projections (a stored buffer would keep an earlier dtype's rounding)."""
        heads = torch.arange(self.n_heads, dtype=torch.float64, device=like.device)
        return torch.log1p(-(2.0 ** (-5.0 - heads))).to(self.q_proj.weight.dtype)

    def mix(self, x: torch.Tensor, state: MixerState | None, op: AffineOp) -> tuple[torch.Tensor, MixerState]:
        b, t, _ = x.shape
        h = self.n_heads
        q = self.q_proj(x).view(b, t, h, -1) * self.head_k_dim**-0.5
        k = self.k_proj(x).view(b, t, h, -1)
        v = self.v_proj(x).view(b, t, h, -1)
        log_decay = self.log_gamma(x).view(1, 1, h, 1).expand(b, t, h, 1)
        o, s = op(q, k, v, log_decay, None if state is None else state.state)
        o = self.o_norm(o).reshape(b, t, -1) * F.silu(self.g_proj(x))
        return self.o_proj(o), MixerState(s)


class RetNet(AffineLM):
    mixer_cls = RetNetMixer
