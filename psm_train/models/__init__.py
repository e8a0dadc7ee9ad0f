"""Models selected by ``model.name``: each a CausalLM with a typed config and an online generation state."""

from __future__ import annotations

from psm_train.models.base import CausalLM, GenerationState
from psm_train.models.gla import GLA, GLAConfig
from psm_train.models.linear_attention import LinearAttention, LinearAttentionConfig
from psm_train.models.mamba2 import Mamba2, Mamba2Config
from psm_train.models.retnet import RetNet, RetNetConfig
from psm_train.models.transformer import Transformer, TransformerConfig
from psm_train.models.transformer_psm import TransformerPSM, TransformerPSMConfig

MODELS: dict[str, tuple[type, type[CausalLM]]] = {
    "transformer": (TransformerConfig, Transformer),
    "transformer_psm": (TransformerPSMConfig, TransformerPSM),
    "gla": (GLAConfig, GLA),
    "mamba2": (Mamba2Config, Mamba2),
    "retnet": (RetNetConfig, RetNet),
    "linear_attention": (LinearAttentionConfig, LinearAttention),
}
MODEL_CONFIGS = {name: cfg for name, (cfg, _) in MODELS.items()}


def build_model(name: str, cfg, vocab_size: int) -> CausalLM:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name][1](cfg, vocab_size)


__all__ = ["MODELS", "MODEL_CONFIGS", "CausalLM", "GenerationState", "build_model"]
