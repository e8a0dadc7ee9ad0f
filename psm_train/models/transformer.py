"""Decoder-only transformer baseline: pre-norm, rotary positions, SwiGLU MLP, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from psm_train.models.base import CausalLM, check_fresh, require_dropout
from psm_train.models.layers import Block, KVCache, RMSNorm, Rope, init_weights, rotary


@dataclass
class TransformerConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on the token embeddings and every residual branch's output, in training only
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    sliding_window: int | None = None  # each token attends to its last `sliding_window` tokens
    tie_embeddings: bool = True

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: d_model / n_heads must be an even integer, got {self.d_model} / {self.n_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window: expected a positive integer or null, got {self.sliding_window}")
        require_dropout(self.dropout)


class Transformer(CausalLM):
    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.init_vocab(vocab_size, cfg.d_model)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.dropout)
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> Rope:
        return rotary(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, like.dtype)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_drop(self.embed(tokens))
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.rope(positions.to(tokens.device), x)
        for block in self.blocks:
            x = block(x, rope, causal=True, window=self.cfg.sliding_window)
        return x

    def init_generation(self, batch_size: int) -> TransformerGenerationState:
        return TransformerGenerationState(self)


class TransformerGenerationState:
    """A KV cache per layer (the last `sliding_window` positions when set): O(n) memory."""

    def __init__(self, model: Transformer):
        self.model = model
        self.caches = [KVCache(window=model.cfg.sliding_window) for _ in model.blocks]
        self.tokens = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed(tokens)[:, None]
        rope = m.rope(torch.tensor([self.tokens], device=tokens.device), x)
        for block, cache in zip(m.blocks, self.caches):
            x = block(x, rope, causal=True, window=m.cfg.sliding_window, cache=cache)
        self.tokens += 1
        return m.logits(x[:, 0])

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        check_fresh(self.tokens, tokens)
        m = self.model
        x = m.embed(tokens)
        rope = m.rope(torch.arange(tokens.shape[1], device=tokens.device), x)
        for block, cache in zip(m.blocks, self.caches):
            x = block(x, rope, causal=True, window=m.cfg.sliding_window, cache=cache)
        self.tokens = tokens.shape[1]
        return m.logits(x[:, -1])

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches)

    def describe(self) -> dict[str, int]:
        return {"tokens": self.tokens, "state_bytes": self.nbytes()}
