"""Parallelism applied to an unmodified single-device model, in one place and this order:

1. sequence parallelism: the model's sequence ops (attention, the prefix scan, the chunked affine
   recurrence and its convolution halo) are replaced by their cross-rank versions, per model family;
2. activation checkpointing of every block;
3. torch.compile of every transformer block;
4. the engine: replicated data parallelism (torch) or DeepSpeed ZeRO.

The training loop and evaluation call `parallelize` once and ask the returned `SequenceSharding`
which part of a sequence this rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from psm_train.config import ParallelConfig, TrainConfig
from psm_train.distributed.affine_exchange import SplitChunkAffine
from psm_train.distributed.context_parallel import ContextParallelAttention
from psm_train.distributed.halo import PreviousRankTail
from psm_train.distributed.sequence import SequenceParallel, shard_sequence, slice_positions
from psm_train.distributed.tree_exchange import SplitPrefixScan, check_tree_slices
from psm_train.models.affine_lm import AffineBlock, AffineLM
from psm_train.models.layers import Block
from psm_train.models.transformer import Transformer
from psm_train.models.transformer_psm import TransformerPSM
from psm_train.train.engine import build_engine


@dataclass
class SequenceSharding:
    """How the sequences of a batch are cut across this rank's sequence-parallel group.

    contiguous (the PSMs: the carry flows rank to rank in order) or zigzag (the transformer: equal
    causal attention work per rank); see `psm_train.distributed.sequence`.
    """

    sp: SequenceParallel | None
    layout: str = "contiguous"
    chunk_size: int | None = None  # Transformer-PSM: every rank holds whole chunks, a power of two of them

    def check(self, seq_len: int) -> None:
        """Raise ValueError, saying what to change, when seq_len cannot be split across the group."""
        if self.sp is None:
            return
        size = self.sp.size
        if self.chunk_size is not None:
            c = self.chunk_size
            if seq_len % (size * c):
                raise ValueError(f"sequence length {seq_len} is not divisible by parallel.sp * model.chunk_size = "
                                 f"{size} * {c}: every rank must hold whole chunks")
            check_tree_slices(seq_len // (size * c), size)
        slice_positions(seq_len, 0, size, self.layout)

    def splits(self, seq_len: int) -> bool:
        """Whether sequences of this length are split (else every rank of the group runs them whole)."""
        try:
            self.check(seq_len)
        except ValueError:
            return False
        return self.sp is not None

    def positions(self, seq_len: int) -> torch.Tensor:
        """The global positions [T_local] of the tokens this rank holds of a split sequence."""
        return slice_positions(seq_len, self.sp.rank, self.sp.size, self.layout)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of x [B, T, ...] along dim 1 (x itself when sequences are not split)."""
        return shard_sequence(x, self.sp, self.layout)

    @contextlib.contextmanager
    def whole_sequences(self) -> Iterator[None]:
        """Run the model on whole sequences meanwhile: the sequence ops act as their single-device ops."""
        if self.sp is None:
            yield
            return
        self.sp.active = False
        try:
            yield
        finally:
            self.sp.active = True


def apply_sequence_parallel(model: nn.Module, sp: SequenceParallel | None) -> SequenceSharding:
    """Replace the model's sequence ops by their cross-rank versions over ``sp`` (none when sp is None)."""
    if sp is None:
        return SequenceSharding(None)
    if isinstance(model, Transformer):
        for block in model.blocks:
            block.attn.attend = ContextParallelAttention(sp)
        return SequenceSharding(sp, layout="zigzag")
    if isinstance(model, TransformerPSM):
        model.scan = SplitPrefixScan(sp)
        return SequenceSharding(sp, chunk_size=model.cfg.chunk_size)
    if isinstance(model, AffineLM):
        for layer in model.layers:
            layer.mixer.chunk_affine = SplitChunkAffine(sp)
            layer.mixer.previous_tail = PreviousRankTail(sp)
        return SequenceSharding(sp)
    raise ValueError(f"{type(model).__name__}: no sequence parallelism for this model family")


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Recompute the activations of every ``every``-th block (module order, the first included) in the backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as wrap

    blocks = [m for m in model.modules() if isinstance(m, (Block, AffineBlock))]
    chosen = {id(m) for m in blocks[::every]}
    wrap(model, check_fn=lambda m: id(m) in chosen)


def apply_compile(model: nn.Module) -> None:
    """torch.compile every transformer Block in place (parameter names unchanged); affine blocks stay eager."""
    config = torch._dynamo.config
    # One graph per call shape (Agg and Inf, a chunk with or without its prefix, training and evaluation):
    # past dynamo's default limit of 8 the rest would run eager. Older torch versions call it cache_size_limit.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 32))
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()


def compiles_blocks(par: ParallelConfig, device: torch.device) -> bool:
    """``parallel.compile_blocks``: auto compiles on GPU (where it pays), except under ZeRO-3."""
    if par.compile_blocks == "auto":
        return device.type == "cuda" and par.zero_stage != 3
    return bool(par.compile_blocks)


def parallelize(model: nn.Module, train: TrainConfig, par: ParallelConfig, sp: SequenceParallel | None,
                micro_batch: int, device: torch.device, bf16_engine: bool):
    """Apply sequence parallelism, activation checkpointing, compilation and the engine to ``model``
    (on ``device``). Returns (engine, sharding)."""
    sharding = apply_sequence_parallel(model, sp)
    if par.activation_checkpointing:
        apply_activation_checkpointing(model, par.checkpoint_every)
    if compiles_blocks(par, device):
        apply_compile(model)
    engine = build_engine(model, train, par, micro_batch, bf16=bf16_engine)
    return engine, sharding
