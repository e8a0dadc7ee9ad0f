"""Linear attention (Katharopoulos et al. 2020): the affine recurrence with no decay.

Per head, S_t = S_{t-1} + φ(k_t) v_t^T and o_t = S_t^T φ(q_t) K^-0.5, with φ the identity or
elu(x) + 1 (``feature_map``). The output is RMS-normalised per head in place of the original
φ(q_t)·Σφ(k_j) denominator (as in TransNormer and fla), then projected back to d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.models.affine_lm import AffineLM, AffineLMConfig, AffineMixer, AffineOp, MixerState, require_head_split
from psm_train.models.layers import RMSNorm

FEATURE_MAPS = ("identity", "elu")


@dataclass
class LinearAttentionConfig(AffineLMConfig):
    feature_map: str = "identity"  # identity | elu (elu(x) + 1)

    def validate(self) -> None:
        super().validate()
        require_head_split(self.n_heads, d_model=self.d_model)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")


class LinearAttentionMixer(AffineMixer):
    def __init__(self, cfg: LinearAttentionConfig):
        head_dim = cfg.d_model // cfg.n_heads
        super().__init__(cfg, cfg.n_heads, head_dim, head_dim)
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_norm = RMSNorm(head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.feature_map = cfg.feature_map

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1 if self.feature_map == "elu" else x

    def mix(self, x: torch.Tensor, state: MixerState | None, op: AffineOp) -> tuple[torch.Tensor, MixerState]:
        b, t, _ = x.shape
        h = self.n_heads
        q = self.phi(self.q_proj(x).view(b, t, h, -1)) * self.head_k_dim**-0.5
        k = self.phi(self.k_proj(x).view(b, t, h, -1))
        v = self.v_proj(x).view(b, t, h, -1)
        log_decay = x.new_zeros(b, t, h, 1)
        o, s = op(q, k, v, log_decay, None if state is None else state.state)
        return self.o_proj(self.o_norm(o).reshape(b, t, -1)), MixerState(s)


class LinearAttention(AffineLM):
    mixer_cls = LinearAttentionMixer
