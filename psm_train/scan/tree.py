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
    blocks: list[torch.Tensor], n: int, agg: Aggregator, root_prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """Exclusive prefixes [B, n, *S] from the upsweep's blocks.

    The root of the tree (padded to a power of two) gets ``root_prefix`` (None: identity). A
    left child inherits its parent's prefix; a right child gets Agg(parent prefix, left sibling).
    Without a root prefix the node starting at chunk 0 has the identity as prefix; its slot holds
    a placeholder (zeros) whose Agg result is never used.
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
        if root_prefix is None:
            # The first right child's parent has the identity prefix: Agg(e, y) = y.
            right = left_sibling[:, :1]
            if n_right > 1:
                right = torch.cat((right, _agg_batched(agg, parent[:, 1:], left_sibling[:, 1:])), dim=1)
        else:
            right = _agg_batched(agg, parent, left_sibling)
        if n_right < prefix.shape[1]:
            right = torch.cat((right, torch.zeros_like(prefix[:, :1])), dim=1)
        prefix = torch.stack((prefix, right), dim=2).flatten(1, 2)[:, :n_children]
    return prefix


def prefix_scan(
    x: torch.Tensor, agg: Aggregator, root_prefix: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Exclusive prefix scan of chunk states along the fixed Blelloch tree.

    x: [B, n, *S] chunk states; agg(older, newer) maps two [N, *S] tensors to [N, *S].
    root_prefix: [B, *S], the prefix of everything before x when x is an aligned power-of-two
    block of a larger tree (sequence parallelism); None means x starts the sequence.

    Returns (prefixes [B, n, *S], first_has_prefix): prefixes[:, i] is P_i; first_has_prefix is
    False when there is no root prefix, and prefixes[:, 0] is then zeros and must not be used. Each
    tree level is one batched agg call; about 2n agg applications in total.
    """
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"prefix_scan expects x of shape [B, n, *S] with n >= 1, got {tuple(x.shape)}")
    n = x.shape[1]
    if root_prefix is not None and n & (n - 1):
        raise ValueError(f"with a root_prefix, x must hold a power-of-two number of chunks, got {n}")
    return downsweep(upsweep(x, agg), n, agg, root_prefix), root_prefix is not None


class OnlineScan:
    """The binary counter: the same tree as `prefix_scan`, one chunk at a time.

    roots[k] holds the aggregate of one aligned block of 2^k chunks (or None). Pushing a chunk
    carries like binary addition, which rebuilds exactly the upsweep's blocks. The prefix is the
    left fold of the roots from the largest block to the smallest, which is exactly the
    downsweep's fold. ``folds[k]`` caches the fold of the roots at levels >= k, so that a push costs
    its carries plus one fold: amortized at most 2 Agg calls per chunk, parenthesisation unchanged.
    `prefill` (or `from_upsweep`) builds the counter of a whole prompt's chunks from one parallel
    upsweep instead of pushing them one by one.
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

    @classmethod
    def from_upsweep(cls, blocks: list[torch.Tensor], n: int, agg: Aggregator) -> OnlineScan:
        """The counter after pushing chunks 0..n-1 one by one, read off `upsweep`'s ``blocks``.

        blocks: upsweep(x, agg) for chunk states x [B, n', *S], n' >= n. The root at level k (bit k
        of n set) is the aligned block of 2^k chunks that ends where the lower bits of n begin: the
        block the carries of the pushes would have built. The cached folds are the roots' left folds
        from the largest block down, as `push` builds them: popcount(n) - 1 Agg calls.
        """
        available = blocks[0].shape[1]
        if not 0 <= n <= available:
            raise ValueError(f"n: expected 0 <= n <= {available} (the chunks the blocks were built from), got {n}")
        scan = cls(agg)
        levels = n.bit_length()
        scan.roots = [None] * levels
        scan.folds = [None] * levels
        above = None
        for k in range(levels - 1, -1, -1):
            if n >> k & 1:
                root = blocks[k][:, (n >> k) - 1].clone()  # a copy: a view would keep the whole level alive
                scan.roots[k] = root
                scan.folds[k] = above = root if above is None else scan._call(above, root)
        scan.chunks = n
        return scan

    @classmethod
    def prefill(cls, x: torch.Tensor, agg: Aggregator) -> OnlineScan:
        """The counter after pushing the chunk states x [B, n, *S] one by one, built from one parallel
        upsweep (one batched Agg call per level) plus popcount(n) - 1 fold calls, all counted in agg_calls."""
        if x.dim() < 2:
            raise ValueError(f"prefill expects x of shape [B, n, *S], got {tuple(x.shape)}")
        calls = 0

        def counted(older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return agg(older, newer)

        blocks = upsweep(x, counted)
        scan = cls.from_upsweep(blocks, x.shape[1], agg)
        scan.agg_calls += calls
        return scan

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
