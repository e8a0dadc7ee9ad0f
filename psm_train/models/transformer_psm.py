"""Transformer-PSM (PSM.md section 4): Enc = token embedding, Agg and Inf = transformer blocks.

The sequence is cut into chunks of c tokens. Agg(older, newer) runs bidirectional blocks over the
2c vectors [older ; newer] and keeps the last c. The exclusive prefix s_{i-1} of chunk i comes from
the fixed Blelloch tree (`psm_train.scan`). Inf runs causal blocks over [s_{i-1} ; chunk i] and
predicts every token of the chunk; chunk 0 has no prefix and Inf sees the chunk alone.

Positions are rotary and local to the 2c-token windows: prefix slots 0..c-1, chunk tokens c..2c-1,
in training and generation alike, so nothing depends on the absolute chunk index and any length
can be evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from psm_train.graph_anchor import graph_anchor
from psm_train.models.base import CausalLM, check_fresh, require_dropout, tensor_nbytes
from psm_train.models.layers import Block, KVCache, RMSNorm, Rope, init_weights, rotary
from psm_train.scan import OnlineScan, prefix_scan


@dataclass
class TransformerPSMConfig:
    d_model: int = 256
    n_heads: int = 4
    chunk_size: int = 64
    agg_layers: int = 1
    inf_layers: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on the token embeddings and every residual branch's output, in training only
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def validate(self) -> None:
        for name in ("d_model", "n_heads", "chunk_size", "agg_layers", "inf_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads: d_model / n_heads must be an even integer, got {self.d_model} / {self.n_heads}")
        require_dropout(self.dropout)


def run_blocks(blocks: nn.ModuleList, z: torch.Tensor, rope: Rope, *, causal: bool, keep: int) -> torch.Tensor:
    """The blocks over the window z [N, W, d]; returns the last ``keep`` positions [N, keep, d].

    The last block computes only those positions (their queries, output projection and MLP): the
    others would be dropped (Inf's prefix slots, Agg's older half). It takes that path also when it
    keeps every position (a first chunk without prefix), so that every call runs the same modules.
    """
    for i, block in enumerate(blocks):
        z = block(z, rope, causal=causal, only_last=keep if i == len(blocks) - 1 else None)
    return z


class TransformerPSM(CausalLM):
    """``scan`` is the prefix scan over chunk states, `psm_train.scan.prefix_scan` by default; the
    parallelize step replaces it by the cross-rank tree when a sequence is split across ranks."""

    def __init__(self, cfg: TransformerPSMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.init_vocab(vocab_size, cfg.d_model)
        self.embed_drop = nn.Dropout(cfg.dropout)

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.dropout) for _ in range(n)
            )

        self.agg_blocks = blocks(cfg.agg_layers)
        self.inf_blocks = blocks(cfg.inf_layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_weights(self, cfg.agg_layers + cfg.inf_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.scan = prefix_scan

    def window_rope(self, start: int, stop: int, like: torch.Tensor) -> Rope:
        """The rotary table of window positions start..stop-1 (of 0..2c-1), on like's device and dtype."""
        positions = torch.arange(start, stop, device=like.device)
        return rotary(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, like.dtype)

    def aggregate(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        """Agg: [N, c, d] x [N, c, d] -> [N, c, d], the right half of bidirectional blocks."""
        z = torch.cat((older, newer), dim=1)
        rope = self.window_rope(0, 2 * self.cfg.chunk_size, z)
        return run_blocks(self.agg_blocks, z, rope, causal=False, keep=newer.shape[1])

    def infer(self, prefix: torch.Tensor | None, chunk: torch.Tensor) -> torch.Tensor:
        """Inf: hidden states [N, c', d] of the chunk's tokens given the prefix state [N, c, d] or None."""
        c = self.cfg.chunk_size
        if prefix is None:
            z, rope = chunk, self.window_rope(c, c + chunk.shape[1], chunk)
        else:
            z, rope = torch.cat((prefix, chunk), dim=1), self.window_rope(0, c + chunk.shape[1], chunk)
        return run_blocks(self.inf_blocks, z, rope, causal=True, keep=chunk.shape[1])

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """T of any length (the last chunk is padded at the end). Positions are chunk-local (the
        module docstring), so ``positions`` is not needed."""
        b, t = tokens.shape
        c, d = self.cfg.chunk_size, self.cfg.d_model
        n = -(-t // c)
        # Padding comes after every real token: causal Inf never sees it, and the last chunk's
        # state feeds no real prefix.
        x = F.pad(self.embed_drop(self.embed(tokens)), (0, 0, 0, n * c - t)).view(b, n, c, d)
        prefixes, first_has_prefix = self.scan(x, self.aggregate)
        # The first chunk of a sequence has no prefix (P_0, the identity): Inf sees it alone. It is
        # always a call of its own, so that a later slice of a split sequence (whose first chunk has a
        # prefix) calls the Inf blocks exactly as often as the first slice.
        h = self.infer(prefixes[:, 0] if first_has_prefix else None, x[:, 0])
        if n > 1:
            rest = self.infer(prefixes[:, 1:].reshape(b * (n - 1), c, d), x[:, 1:].reshape(b * (n - 1), c, d))
            h = torch.cat((h, rest.reshape(b, (n - 1) * c, d)), dim=1)
        # The scan stays in the graph even where no prefix is used (one chunk without a prefix): a scan
        # that exchanges across ranks must run its backward on every rank. An exact zero.
        return (h + graph_anchor(prefixes))[:, :t]

    def init_generation(self, batch_size: int) -> TransformerPSMGenerationState:
        return TransformerPSMGenerationState(self)


class TransformerPSMGenerationState:
    """Binary counter over finished chunks plus an Inf KV cache over at most 2c positions."""

    def __init__(self, model: TransformerPSM):
        self.model = model
        self.scan = OnlineScan(model.aggregate)
        self.chunk: list[torch.Tensor] = []  # embeddings [B, 1, d] of the current chunk's tokens
        self.caches: list[KVCache] = []
        self.tokens = 0

    def _start_chunk(self) -> None:
        """Fresh Inf caches, filled with the prefix state of the chunk about to start."""
        m = self.model
        self.caches = [KVCache() for _ in m.inf_blocks]
        prefix = self.scan.prefix()
        if prefix is None:
            return
        z = prefix
        rope = m.window_rope(0, m.cfg.chunk_size, prefix)
        for block, cache in zip(m.inf_blocks, self.caches):
            z = block(z, rope, causal=True, cache=cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        c = m.cfg.chunk_size
        if not self.chunk:
            self._start_chunk()
        x = m.embed(tokens)[:, None]
        rope = m.window_rope(c + len(self.chunk), c + len(self.chunk) + 1, x)
        h = x
        for block, cache in zip(m.inf_blocks, self.caches):
            h = block(h, rope, causal=True, cache=cache)
        self.chunk.append(x)
        self.tokens += 1
        if len(self.chunk) == c:
            self.scan.push(torch.cat(self.chunk, dim=1))
            self.chunk = []
        return m.logits(h[:, 0])

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """The counter of every chunk but the last from one parallel upsweep (`OnlineScan.prefill`); the
        last chunk's tokens (1 to c of them) are stepped, which yields their logits."""
        check_fresh(self.tokens, tokens)
        m = self.model
        (b, n), c = tokens.shape, m.cfg.chunk_size
        full = (n - 1) // c
        if full:
            x = m.embed(tokens[:, : full * c]).view(b, full, c, m.cfg.d_model)
            self.scan = OnlineScan.prefill(x, m.aggregate)
            self.tokens = full * c
        for t in range(full * c, n):
            logits = self.step(tokens[:, t])
        return logits

    def nbytes(self) -> int:
        return self.scan.nbytes() + sum(c.nbytes() for c in self.caches) + tensor_nbytes(*self.chunk)

    def describe(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "chunks": self.scan.chunks,
            "roots": self.scan.num_roots,
            "agg_calls": self.scan.agg_calls,
            "state_bytes": self.nbytes(),
        }
