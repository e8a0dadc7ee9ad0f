"""The skeleton shared by the affine PSMs of PSM.md section 2 (GLA, Mamba2, RetNet, linear attention).

    embedding → n_layers × [x + mixer(norm(x)); x + SwiGLU(norm(x))] → RMSNorm → lm head

The models differ only in their mixer: how it forms q, k, v and the log decay from x, and how it
reads the recurrence's output. A mixer writes that once, in `mix`, against an `AffineOp`: the
chunkwise op for `forward` (training, prefill, a slice of a sequence-parallel sequence) and the
one-token recurrent step for `step` (generation), so the two modes cannot drift apart. Both carry
a `MixerState` in and out, whose size does not depend on the number of tokens seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from psm_train.kernels.chunk_affine import BACKENDS, affine_step, chunk_affine
from psm_train.models.base import CausalLM, check_fresh, require_dropout, tensor_nbytes
from psm_train.models.layers import RMSNorm, SwiGLU, init_weights, swiglu_hidden

# (q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], log_decay [B, T, H, K | 1], state [B, H, K, V] | None)
#   -> (o [B, T, H, V], state [B, H, K, V])
AffineOp = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


def require_positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name}: expected a positive number, got {value}")


def require_head_split(n_heads: int, **dims: int) -> None:
    """n_heads must be positive and divide every named width (e.g. key_dim=..., value_dim=...)."""
    if n_heads <= 0:
        raise ValueError(f"n_heads: expected a positive integer, got {n_heads}")
    for name, dim in dims.items():
        if dim <= 0 or dim % n_heads:
            raise ValueError(f"n_heads: expected a divisor of {name} ({dim}), got {n_heads}")


@dataclass
class AffineLMConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    chunk_size: int = 64
    kernel: str = "auto"  # chunk_affine backend: auto (Triton on GPU), triton or reference
    mlp_ratio: float = 4.0  # 0 disables the MLP
    dropout: float = 0.0  # on the token embeddings and every residual branch's output, in training only
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def validate(self) -> None:
        """Checks common to every affine model; each model adds its own (heads, widths)."""
        require_positive(self, "d_model", "n_layers", "chunk_size", "norm_eps")
        if self.kernel not in BACKENDS:
            raise ValueError(f"kernel: expected one of {BACKENDS}, got {self.kernel!r}")
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio: expected a number >= 0 (0 disables the MLP), got {self.mlp_ratio}")
        require_dropout(self.dropout)


@dataclass
class MixerState:
    """Carry of one mixer layer for B sequences.

    state: [B, H, K, V], the affine recurrence's state (None: zeros). conv: [B, channels, width - 1],
    the last inputs of a short causal convolution (Mamba2), else None.
    """

    state: torch.Tensor | None
    conv: torch.Tensor | None = None

    def nbytes(self) -> int:
        return tensor_nbytes(self.state, self.conv)


def _one_token(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent step as an AffineOp on T = 1."""
    o, state = affine_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state)
    return o[:, None], state


class AffineMixer(nn.Module):
    """Token mixer through the affine recurrence, with n_heads heads of state [head_k_dim, head_v_dim].

    ``chunk_affine`` is the chunked recurrence op (`psm_train.kernels.chunk_affine.chunk_affine` by
    default) and ``previous_tail`` the op that fetches the inputs just before x (None: x starts the
    sequence); the parallelize step replaces both when a sequence is split across ranks.
    """

    def __init__(self, cfg: AffineLMConfig, n_heads: int, head_k_dim: int, head_v_dim: int):
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.kernel = cfg.kernel
        self.n_heads = n_heads
        self.head_k_dim = head_k_dim
        self.head_v_dim = head_v_dim
        self.chunk_affine = chunk_affine
        self.previous_tail = sequence_start

    def mix(self, x: torch.Tensor, state: MixerState | None, op: AffineOp) -> tuple[torch.Tensor, MixerState]:
        """x [B, T, d] -> y [B, T, d] and the state after x, with the recurrence evaluated by op."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: MixerState | None = None) -> tuple[torch.Tensor, MixerState]:
        """Chunkwise parallel form: x [B, T, d] from state (None: the state x starts in) -> y [B, T, d],
        final state."""

        def op(q, k, v, log_decay, initial_state):
            return self.chunk_affine(
                q, k, v, log_decay, chunk_size=self.chunk_size, initial_state=initial_state, backend=self.kernel
            )

        return self.mix(x, state if state is not None else self.entry_state(x), op)

    def entry_state(self, x: torch.Tensor) -> MixerState | None:
        """The state x starts in when none is given: None (zeros), unless the mixer keeps inputs before
        x (a short convolution's, from ``previous_tail``)."""
        return None

    def step(self, x: torch.Tensor, state: MixerState | None = None) -> tuple[torch.Tensor, MixerState]:
        """Recurrent form, one token: x [B, d] -> y [B, d], next state."""
        y, state = self.mix(x[:, None], state, _one_token)
        return y[:, 0], state

    def init_state(self, batch_size: int) -> MixerState:
        """Zero state, in the dtype the op accumulates in for this mixer's parameters."""
        param = next(self.parameters())
        dtype = torch.promote_types(param.dtype, torch.float32)
        shape = (batch_size, self.n_heads, self.head_k_dim, self.head_v_dim)
        return MixerState(torch.zeros(shape, dtype=dtype, device=param.device))


def sequence_start(x: torch.Tensor, width: int) -> None:
    """The ``previous_tail`` op of an unsplit sequence: nothing comes before x."""
    return None


class AffineBlock(nn.Module):
    """Pre-norm block: x + drop(mixer(norm(x))), then x + drop(SwiGLU(norm(x))) unless mlp_ratio is 0."""

    def __init__(self, cfg: AffineLMConfig, mixer: AffineMixer):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        if cfg.mlp_ratio > 0:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))
        else:
            self.mlp_norm = self.mlp = None
        self.drop = nn.Dropout(cfg.dropout)  # p = 0 returns its input unchanged and draws no random numbers

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.drop(self.mlp(self.mlp_norm(x)))

    def forward(self, x: torch.Tensor, state: MixerState | None = None) -> tuple[torch.Tensor, MixerState]:
        """x [B, T, d] -> [B, T, d], and the mixer's final state."""
        y, state = self.mixer(self.mixer_norm(x), state)
        return self._mlp(x + self.drop(y)), state

    def step(self, x: torch.Tensor, state: MixerState | None) -> tuple[torch.Tensor, MixerState]:
        """x [B, d] -> [B, d], and the mixer's next state."""
        y, state = self.mixer.step(self.mixer_norm(x), state)
        return self._mlp(x + self.drop(y)), state


class AffineLM(CausalLM):
    """Decoder of AffineBlocks. A concrete model sets `mixer_cls`, built once per layer from the config."""

    mixer_cls: type[AffineMixer]

    def __init__(self, cfg: AffineLMConfig, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.init_vocab(vocab_size, cfg.d_model)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(AffineBlock(cfg, self.mixer_cls(cfg)) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Re-initialises Linear and Embedding weights only: the mixers' own parameters (decay
        # rates, time-step biases, convolutions) keep their model-specific init.
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Position enters through the recurrence only: ``positions`` is not needed."""
        x = self.embed_drop(self.embed(tokens))
        for layer in self.layers:
            x, _ = layer(x)
        return x

    def init_generation(self, batch_size: int) -> AffineGenerationState:
        return AffineGenerationState(self, batch_size)


class AffineGenerationState:
    """One MixerState per layer: O(1) memory in the number of tokens seen."""

    def __init__(self, model: AffineLM, batch_size: int):
        self.model = model
        self.states = [layer.mixer.init_state(batch_size) for layer in model.layers]
        self.tokens = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> next-token logits [B, V]."""
        m = self.model
        x = m.embed(tokens)
        for i, layer in enumerate(m.layers):
            x, self.states[i] = layer.step(x, self.states[i])
        self.tokens += 1
        return m.logits(x)

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """The chunked parallel form from the zero states, carrying each layer's final state out."""
        check_fresh(self.tokens, tokens)
        m = self.model
        x = m.embed(tokens)
        for i, layer in enumerate(m.layers):
            x, self.states[i] = layer(x, self.states[i])
        self.tokens = tokens.shape[1]
        return m.logits(x[:, -1])

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.states)

    def describe(self) -> dict[str, int]:
        return {"tokens": self.tokens, "state_bytes": self.nbytes()}
