"""The fixed Blelloch tree of PSM.md section 3: the one place that defines the parenthesisation.

Chunk states x_0 … x_{n-1} and an aggregator Agg(older, newer) that may be neither associative
nor commutative. Block aggregates (upsweep): an aligned block of 2^k chunks is
Agg(left half, right half). Exclusive prefix P_i (downsweep): the aligned blocks covering [0, i),
largest first, left-folded oldest first. P_0 is the identity, represented by a flag, never by a
tensor fed through Agg.

Two evaluations of that one tree live here:
- `prefix_scan`: all prefixes in parallel, one batched Agg call per tree level;
- `OnlineScan`: the binary counter used for generation, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from psm_train.graph_anchor import graph_anchor

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _agg_batched(agg: Aggregator, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
    """Apply agg to [B, m, *S] pairs as one call on [B*m, *S]."""
    b, m = older.shape[:2]
    state_shape = older.shape[2:]
    out = agg(older.reshape(b * m, *state_shape), newer.reshape(b * m, *state_shape))
    return out.reshape(b, m, *out.shape[1:])


def upsweep(x: torch.Tensor, agg: Aggregator) -> list[torch.Tensor]:
    """Aggregates of the complete aligned blocks.

    x: [B, n, *S]. Returns ``blocks`` with blocks[k] [B, n // 2^k, *S]: blocks[k][:, j] is the
    tree aggregate of chunks [j·2^k, (j+1)·2^k). Incomplete blocks (those that would contain the
    end padding) are never needed by a real prefix and are not computed.
    """
    blocks = [x]
    while blocks[-1].shape[1] >= 2:
        level = blocks[-1]
        pairs = level.shape[1] // 2
        blocks.append(_agg_batched(agg, level[:, 0 : 2 * pairs : 2], level[:, 1 : 2 * pairs : 2]))
    return blocks


def downsweep(
    blocks: list[torch.Tensor],
    n: int,
    agg: Aggregator,
    root_prefix: torch.Tensor | None = None,
    uniform_calls: bool = False,
) -> torch.Tensor:
    """Exclusive prefixes [B, n, *S] from the upsweep's blocks.

    The root of the tree (padded to a power of two) gets ``root_prefix`` (None: identity). A
    left child inherits its parent's prefix; a right child gets Agg(parent prefix, left sibling).
    Without a root prefix the node starting at chunk 0 has the identity as prefix; its slot holds
    a placeholder (zeros) whose Agg result is never used.

    uniform_calls: call agg on the same shapes with or without a root prefix (sequence-parallel
    ranks under ZeRO-3 must call the Agg module equally often, forward and backward). Without a
    root prefix the placeholder's pairs are then computed too, and their results only anchored in
    the graph (an exact zero), never used.
    """
    x = blocks[0]
    levels = max(n - 1, 0).bit_length()  # tree height after padding n to a power of two
    if root_prefix is None:
        prefix = torch.zeros_like(x[:, :1])
    else:
        prefix = root_prefix.unsqueeze(1)
    for k in range(levels, 0, -1):
        size = 1 << (k - 1)  # block size of the children
        n_children = -(-n // size)
        n_right = n_children // 2
        left_sibling = blocks[k - 1][:, 0 : 2 * n_right : 2]
        parent = prefix[:, :n_right]
        if root_prefix is None and not uniform_calls:
            # The first right child's parent has the identity prefix: Agg(e, y) = y.
            right = left_sibling[:, :1]
            if n_right > 1:
                right = torch.cat((right, _agg_batched(agg, parent[:, 1:], left_sibling[:, 1:])), dim=1)
        else:
            right = _agg_batched(agg, parent, left_sibling)
            if root_prefix is None:
                right = torch.cat((left_sibling[:, :1] + graph_anchor(right[:, :1]), right[:, 1:]), dim=1)
        if n_right < prefix.shape[1]:
            right = torch.cat((right, torch.zeros_like(prefix[:, :1])), dim=1)
        prefix = torch.stack((prefix, right), dim=2).flatten(1, 2)[:, :n_children]
    return prefix


def prefix_scan(
    x: torch.Tensor, agg: Aggregator, root_prefix: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix scan of chunk states along the fixed Blelloch tree.

    x: [B, n, *S] chunk states; agg(older, newer) maps two [N, *S] tensors to [N, *S].
    root_prefix: [B, *S], the prefix of everything before x when x is an aligned power-of-two
    block of a larger tree (sequence parallelism); None means x starts the sequence.

    Returns (prefixes [B, n, *S], has_prefix [n] bool): prefixes[:, i] is P_i; has_prefix is
    False only at i = 0 when there is no root prefix (prefixes[:, 0] is then zeros and must not be
    used). Each tree level is one batched agg call; about 2n agg applications in total.
    """
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"prefix_scan expects x of shape [B, n, *S] with n >= 1, got {tuple(x.shape)}")
    n = x.shape[1]
    if root_prefix is not None and n & (n - 1):
        raise ValueError(f"with a root_prefix, x must hold a power-of-two number of chunks, got {n}")
    prefixes = downsweep(upsweep(x, agg), n, agg, root_prefix)
    has_prefix = torch.ones(n, dtype=torch.bool, device=x.device)
    if root_prefix is None:
        has_prefix[0] = False
    return prefixes, has_prefix


class OnlineScan:
    """The binary counter: the same tree as `prefix_scan`, one chunk at a time.

    roots[k] holds the aggregate of one aligned block of 2^k chunks (or None). Pushing a chunk
    carries like binary addition, which rebuilds exactly the upsweep's blocks. The prefix is the
    left fold of the roots from the largest block to the smallest, which is exactly the
    downsweep's fold. ``folds[k]`` caches the fold of the roots at levels >= k, so that a push costs
    its carries plus one fold: amortized at most 2 Agg calls per chunk, parenthesisation unchanged.
    """

    def __init__(self, agg: Aggregator):
        self.agg = agg
        self.roots: list[torch.Tensor | None] = []
        self.folds: list[torch.Tensor | None] = []
        self.agg_calls = 0
        self.chunks = 0

    def _call(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        self.agg_calls += 1
        return self.agg(older, newer)

    def push(self, x: torch.Tensor) -> None:
        """Add the next chunk state x [B, *S]."""
        cur, level = x, 0
        while level < len(self.roots) and self.roots[level] is not None:
            cur = self._call(self.roots[level], cur)
            self.roots[level] = self.folds[level] = None
            level += 1
        if level == len(self.roots):
            self.roots.append(None)
            self.folds.append(None)
        above = next((f for f in self.folds[level + 1 :] if f is not None), None)
        self.roots[level] = cur
        self.folds[level] = cur if above is None else self._call(above, cur)
        self.chunks += 1

    def prefix(self) -> torch.Tensor | None:
        """P_t, the aggregate of all t chunks pushed so far; None (the identity) when t = 0."""
        return next((f for f in self.folds if f is not None), None)

    @property
    def num_roots(self) -> int:
        return sum(r is not None for r in self.roots)

    def nbytes(self) -> int:
        """Bytes held in roots and cached folds."""
        held = [t for t in self.roots + self.folds if t is not None]
        return sum(t.numel() * t.element_size() for t in held)
