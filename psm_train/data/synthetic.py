"""Synthetic tasks: multi-query associative recall (MQAR) and S5 state tracking (or S_n, n = 2..6).

Every batch is drawn from the caller's ``torch.Generator`` only, so it is a pure function of that
generator's seed and state: no global RNG, no numpy randomness.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from psm_train.labels import IGNORE_INDEX

QUERY_PLACEMENTS = ("power_law", "uniform")
FILLERS = ("zero", "random")
DISTANCES = ("same", "1", ">=2")  # buckets of the chunk distance between a query and its key


def _check_lens(name: str, lens: list[int], minimum: int) -> None:
    """Raise ValueError unless every entry of ``lens`` is an int >= ``minimum``."""
    bad = [n for n in lens if not isinstance(n, int) or n < minimum]
    if bad:
        raise ValueError(f"{name}: expected integers >= {minimum}, got {bad}")


def _unique(lens: list[int]) -> list[int]:
    """``lens`` without duplicates, first occurrence kept."""
    return list(dict.fromkeys(lens))


@dataclass
class MQARConfig:
    """Zoology-style multi-query associative recall.

    Query placement: the gap k (in two-token slots after the context) of each query is drawn
    without replacement. ``power_law``: p(k) ∝ a·k^(a-1) with a = power_a (default 0.01, Zoology's
    default and the paper authors' Transformer-PSM setting: most queries just after the context).
    ``uniform``: every gap equally likely (a = 1; the authors' Mamba setting, where recall must
    reach across the sequence).

    Filler: ``zero`` puts token 0 everywhere outside the context pairs and query slots, and a query
    slot holds its key and value. ``random`` is the authors' generator (Zoology's
    ``random_non_queries``): a query slot holds only its key, every other position after the
    context a uniform token of the whole vocabulary, and the values of an example are distinct.
    """

    vocab_size: int = 8192
    num_kv_pairs: int = 8
    seq_len: int = 256  # training length
    query_placement: str = "power_law"  # power_law | uniform
    power_a: float | None = None  # power_law's a; None: 0.01. Only with query_placement power_law.
    filler: str = "zero"  # zero | random
    # evaluation: accuracy by the distance in chunks between a query and its key is measured with this
    # chunk; 0: the model's chunk_size, or 64 for a model without one.
    distance_chunk: int = 0
    eval_seq_lens: list[int] = field(default_factory=list)  # extra lengths, same num_kv_pairs

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") on an inconsistent configuration."""
        if self.num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs: expected >= 1, got {self.num_kv_pairs}")
        # Keys come from [1, vocab_size // 2) and must be distinct within an example.
        min_vocab = 2 * (self.num_kv_pairs + 1)
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size: expected >= {min_vocab} for {self.num_kv_pairs} distinct keys, got {self.vocab_size}"
            )
        # 2D context tokens plus at least D two-token query slots.
        min_len = 4 * self.num_kv_pairs
        if self.seq_len < min_len:
            raise ValueError(f"seq_len: expected >= 4 * num_kv_pairs = {min_len}, got {self.seq_len}")
        if self.query_placement not in QUERY_PLACEMENTS:
            raise ValueError(f"query_placement: expected one of {', '.join(QUERY_PLACEMENTS)}, got {self.query_placement!r}")
        if self.power_a is not None:
            if self.query_placement != "power_law":
                raise ValueError(f"power_a: only for query_placement power_law, got {self.power_a} with {self.query_placement}")
            if not self.power_a > 0:
                raise ValueError(f"power_a: expected > 0, got {self.power_a}")
        if self.filler not in FILLERS:
            raise ValueError(f"filler: expected one of {', '.join(FILLERS)}, got {self.filler!r}")
        if self.distance_chunk < 0:
            raise ValueError(f"distance_chunk: expected an integer >= 0 (0: the model's chunk_size), got {self.distance_chunk}")
        _check_lens("eval_seq_lens", self.eval_seq_lens, min_len)

    def gap_weights(self, space: int) -> Tensor:
        """Unnormalised probabilities [space] float64 of the query gaps k = 1..space."""
        if self.query_placement == "uniform":
            return torch.ones(space, dtype=torch.float64)
        a = 0.01 if self.power_a is None else self.power_a
        k = torch.arange(1, space + 1, dtype=torch.float64)
        return a * k ** (a - 1)


@dataclass
class S5Config:
    """S5 state tracking: the word problem of the symmetric group on ``degree`` elements.

    degree 5 (the default) is S5 with 120 group elements; degree 3 is S3 (6), degree 4 is S4 (24).
    """

    degree: int = 5  # the group is S_degree, with degree! elements (the vocabulary and the classes)
    min_len: int = 2
    max_len: int = 18  # longest training length
    curriculum_steps: int = 0  # 0: uniform in [min_len, max_len]; > 0: upper bound grows linearly
    eval_seq_lens: list[int] = field(default_factory=lambda: [18, 36, 72, 180])

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") on an inconsistent configuration."""
        if not isinstance(self.degree, int) or not 2 <= self.degree <= 6:
            raise ValueError(f"degree: expected an integer in [2, 6], got {self.degree!r}")
        if self.min_len < 1:
            raise ValueError(f"min_len: expected >= 1, got {self.min_len}")
        if self.max_len < self.min_len:
            raise ValueError(f"max_len: expected >= min_len = {self.min_len}, got {self.max_len}")
        if self.curriculum_steps < 0:
            raise ValueError(f"curriculum_steps: expected >= 0, got {self.curriculum_steps}")
        _check_lens("eval_seq_lens", self.eval_seq_lens, 1)


@dataclass(frozen=True)
class RecallDistance:
    """What the evaluation needs to score each query by the chunk distance to its key."""

    key_positions: Callable[[Tensor, Tensor], Tensor]  # (inputs, targets) [B, T] -> [B, T], see MQAR.key_positions
    chunk: int  # 0: the model's chunk_size, or DEFAULT_DISTANCE_CHUNK for a model without one


DEFAULT_DISTANCE_CHUNK = 64


def distance_buckets(key_positions: Tensor, chunk: int) -> Tensor:
    """Index into DISTANCES of each scored position of ``key_positions`` [..., T] (-1 elsewhere).

    Position t and its key at position p (p < t) lie in chunks t // chunk and p // chunk; the bucket
    is their difference, 2 standing for two or more.
    """
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk}")
    t = torch.arange(key_positions.shape[-1], device=key_positions.device)
    apart = (t // chunk - key_positions.clamp_min(0) // chunk).clamp(max=2)
    return torch.where(key_positions >= 0, apart, -1)


class MQAR:
    """Multi-query associative recall batches (see MQARConfig for placement and filler)."""

    sparse_targets = True  # only the num_kv_pairs query positions are scored

    def __init__(self, cfg: MQARConfig):
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.recall_distance = RecallDistance(self.key_positions, cfg.distance_chunk)

    def train_seq_len(self, step: int) -> int:
        """Training length at ``step``: always cfg.seq_len."""
        return self.cfg.seq_len

    def eval_seq_lens(self) -> list[int]:
        """[cfg.seq_len] + cfg.eval_seq_lens without duplicates, in order."""
        return _unique([self.cfg.seq_len, *self.cfg.eval_seq_lens])

    def make_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw (inputs [B, T], targets [B, T]), both int64, with B = batch_size and T = seq_len.

        An example of length T + 1 is ``k1 v1 … kD vD`` followed by filler holding the D queries in
        two-token slots placed as cfg.query_placement says (``k_i v_i`` with zero filler, ``k_i``
        and a filler token with random filler); inputs = example[:-1]. targets[t] is IGNORE_INDEX
        except where inputs[t] is a query key, where it is that key's value.
        """
        d, vocab = self.cfg.num_kv_pairs, self.cfg.vocab_size
        if seq_len < 4 * d:
            raise ValueError(f"seq_len: expected >= 4 * num_kv_pairs = {4 * d}, got {seq_len}")
        half = vocab // 2
        random_filler = self.cfg.filler == "random"

        # Distinct keys per example: the top-d of i.i.d. uniforms is a uniform d-subset.
        keys = torch.rand(batch_size, half - 1, generator=generator).topk(d, dim=1).indices + 1
        if random_filler:  # the authors' generator draws distinct values too
            values = torch.rand(batch_size, vocab - half, generator=generator).topk(d, dim=1).indices + half
        else:
            values = torch.randint(half, vocab, (batch_size, d), generator=generator)

        space = (seq_len + 1 - 2 * d) // 2
        probs = self.cfg.gap_weights(space).expand(batch_size, space)
        slots = torch.multinomial(probs, d, replacement=False, generator=generator)
        # multinomial tends to return likelier (earlier) slots first; shuffle so the query
        # order does not follow the context order.
        order = torch.rand(batch_size, d, generator=generator).argsort(dim=1)
        query_pos = 2 * d + 2 * slots.gather(1, order)

        if random_filler:
            example = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator)
        else:
            example = torch.zeros(batch_size, seq_len + 1, dtype=torch.int64)
        example[:, 0 : 2 * d : 2] = keys
        example[:, 1 : 2 * d : 2] = values
        example.scatter_(1, query_pos, keys)
        if not random_filler:
            example.scatter_(1, query_pos + 1, values)

        # The target at a query key's position is its value (with zero filler also the next token).
        targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.int64)
        targets.scatter_(1, query_pos, values)
        return example[:, :-1], targets

    def key_positions(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """[B, T] int64: for each scored position of a batch of this task, the position of its key in
        the context (the key token of its pair); -1 where nothing is scored."""
        d = self.cfg.num_kv_pairs
        scored = targets != IGNORE_INDEX
        # Context keys are distinct, so a query key matches exactly one of them.
        matches = inputs.unsqueeze(-1) == inputs[:, None, 0 : 2 * d : 2]  # [B, T, D]
        if not bool((matches.sum(-1) == 1)[scored].all()):
            raise ValueError("key_positions: a scored position holds no context key (not a batch of this MQAR task)")
        return torch.where(scored, 2 * matches.long().argmax(-1), -1)


def permutation_table(degree: int = 5) -> tuple[list[tuple[int, ...]], Tensor]:
    """The n! elements of S_n (n = ``degree``; 120 for the default S5) in
    itertools.permutations(range(n)) order, and their composition table.

    Returns (perms, table) with table [n!, n!] int64, table[p, s] = id of perms[p] ∘ perms[s],
    where (π ∘ σ)(i) = π(σ(i)). Id 0 is the identity.
    """
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree: expected an integer >= 1, got {degree!r}")
    perms = list(itertools.permutations(range(degree)))
    index = {p: i for i, p in enumerate(perms)}
    table = [[index[tuple(p[s[i]] for i in range(degree))] for s in perms] for p in perms]
    return perms, torch.tensor(table, dtype=torch.int64)


def permutation_sign(perm: tuple[int, ...]) -> int:
    """0 for an even permutation, 1 for an odd one (the parity of its number of inversions)."""
    return sum(perm[i] > perm[j] for i in range(len(perm)) for j in range(i + 1, len(perm))) % 2


class S5:
    """Word-problem batches of S_n (S5 by default, n = cfg.degree): tokens are permutations, targets
    the running product. vocab_size = n! (120 for S5)."""

    sparse_targets = False

    def __init__(self, cfg: S5Config):
        cfg.validate()
        self.cfg = cfg
        self.perms, self.table = permutation_table(cfg.degree)
        self.vocab_size = len(self.perms)
        # The evaluation's coarser labels: each element's sign (0 even, 1 odd), its image in S_n / A_n. A model that
        # tracks only the running parity gets every sign right and, guessing within the sign, 2/n! of the classes.
        self.class_groups = torch.tensor([permutation_sign(p) for p in self.perms], dtype=torch.int64)

    def train_seq_len(self, step: int) -> int:
        """Training length at ``step``, uniform in [min_len, bound(step)].

        bound grows linearly from min_len to max_len over cfg.curriculum_steps (max_len at once if 0).
        The draw uses a generator seeded with ``step`` so that every rank and every restart agree.
        """
        if step < 0:
            raise ValueError(f"step: expected >= 0, got {step}")
        lo, hi, ramp = self.cfg.min_len, self.cfg.max_len, self.cfg.curriculum_steps
        bound = hi if ramp == 0 else lo + (hi - lo) * min(step, ramp) // ramp
        generator = torch.Generator().manual_seed(step)
        return int(torch.randint(lo, bound + 1, (), generator=generator))

    def eval_seq_lens(self) -> list[int]:
        """[cfg.max_len] + cfg.eval_seq_lens without duplicates, in order."""
        return _unique([self.cfg.max_len, *self.cfg.eval_seq_lens])

    def make_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw (inputs [B, T], targets [B, T]), both int64 ids in [0, n!) (n! = 120 for S5); B = batch_size,
        T = seq_len.

        inputs are uniform group elements π_t; targets[t] is σ_t = π_t ∘ σ_{t-1}, σ_{-1} = identity.
        Every position is scored.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
        inputs = torch.randint(0, self.vocab_size, (batch_size, seq_len), generator=generator)
        targets = torch.empty_like(inputs)
        state = torch.zeros(batch_size, dtype=torch.int64)  # id 0 is the identity
        for t in range(seq_len):
            state = self.table[inputs[:, t], state]
            targets[:, t] = state
        return inputs, targets
