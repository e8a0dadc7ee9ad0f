"""Reading token samples from webdataset tar shards, and one lane's sample stream of an epoch.

Shards open through webdataset's ``gopen`` (local paths, file://, pipe:, http(s)://) and parse
with its tar iterator. A shard that breaks while being read either stops the run with an error
naming it, or (on_corrupt='skip') is warned about, counted, and its unreadable samples are
replaced by samples of the next readable shard of the epoch order. A resumed run replaces a
truncated shard's tail the same way; it may read intact samples behind damage inside a shard
that the uninterrupted run replaced.

A sample holding a token id outside the manifest's vocabulary (bytes overwritten, file size
unchanged) is damage of one sample: it stops the run naming the shard and the sample's key, or
(skip) only that sample is replaced, by the sample at the same position (modulo its length) of the
next readable shard, so a resumed run replaces it identically.
"""

from __future__ import annotations

import bisect
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from psm_train.data.source import derived_seed


class CorruptShard(Exception):
    """A shard that cannot be read to the end or does not hold what its manifest says."""


class BadSample(CorruptShard):
    """One sample of a readable shard holds token ids outside the vocabulary; the samples after it are usable."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index  # the sample's position in its shard


def rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derived_seed(*parts)))


def _seek_to(stream, start: int, size: int) -> bool:
    """Move a local shard written by the builder to the header of sample ``start``.

    Builder shards hold one member of ``size`` data bytes per sample, keyed by consecutive
    numbers, so sample i starts at i * (header + padded data); the first member's size and the
    key found at the target confirm that layout. False: not seekable or another layout (rewound).
    """
    if not (hasattr(stream, "seekable") and stream.seekable()):
        return False
    member = tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    try:
        first = tarfile.TarInfo.frombuf(stream.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
        stream.seek(start * member)
        there = tarfile.TarInfo.frombuf(stream.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
        ok = first.size == size and there.name == f"{int(first.name.split('.')[0]) + start:010d}.tokens"
    except (tarfile.TarError, ValueError):
        ok = False
    stream.seek(start * member if ok else 0)
    return ok


def out_of_vocabulary(tokens: np.ndarray, vocab_size: int) -> int | None:
    """A token id of ``tokens`` outside [0, vocab_size), or None: one vectorised max (and min if signed)."""
    high = tokens.max()
    if high >= vocab_size:
        return int(high)
    if tokens.dtype.kind == "i" and (low := tokens.min()) < 0:
        return int(low)
    return None


def shard_samples(url: str, expected: int, block: int, dtype: str, start: int = 0,
                  vocab_size: int = 0) -> Iterator[np.ndarray]:
    """Samples [start, expected) of one shard, ``block`` tokens each; CorruptShard if it is damaged, BadSample
    (after the samples before it) for one holding a token id outside [0, vocab_size) (0: not checked)."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import tar_file_iterator

    try:
        stream = gopen(url)
    except Exception as e:
        raise CorruptShard(f"cannot open: {e}") from None
    size = block * np.dtype(dtype).itemsize
    count = start if start and _seek_to(stream, start, size) else 0  # else skip by reading
    try:
        for item in tar_file_iterator(stream):
            if not item["fname"].endswith(".tokens"):
                continue
            if count == expected:
                raise CorruptShard(f"more than the {expected} samples its manifest lists")
            if len(item["data"]) != size:
                raise CorruptShard(f"sample {count} ({item['fname']}) holds {len(item['data'])} bytes, expected {size}")
            if count >= start:
                tokens = np.frombuffer(item["data"], dtype)
                if vocab_size and (bad := out_of_vocabulary(tokens, vocab_size)) is not None:
                    key = item["fname"].rsplit(".", 1)[0]
                    raise BadSample(f"sample {count} (key {key}) holds token id {bad}, outside the vocabulary "
                                    f"[0, {vocab_size}) of its manifest", count)
                yield tokens
            count += 1
    except CorruptShard:  # BadSample included
        raise
    except Exception as e:  # tarfile, EOF, gzip, pipe errors: all mean the same to training
        raise CorruptShard(f"unreadable after {count} samples ({type(e).__name__}: {e})") from None
    finally:
        stream.close()
    if count != expected:
        raise CorruptShard(f"{count} samples, the manifest says {expected}")


@dataclass(frozen=True)
class SourcePlan:
    """What a worker needs to read one source's training split (picklable)."""

    index: int
    name: str  # the manifest path, for messages
    urls: tuple[str, ...]
    samples: tuple[int, ...]
    block: int  # tokens per sample: seq_len + 1
    dtype: str
    on_corrupt: str  # 'error' | 'skip'
    vocab_size: int = 0  # the manifest's: token ids outside [0, vocab_size) make a sample bad (0: not checked)

    @property
    def total(self) -> int:
        return sum(self.samples)


class Damage:
    """The damage one process has met: shards warned about once each, bad samples each; counted for the metrics."""

    def __init__(self):
        self.shards: set[str] = set()
        self.samples = 0  # bad samples replaced

    def record(self, url: str, error: CorruptShard, on_corrupt: str) -> None:
        if on_corrupt == "error":
            raise RuntimeError(f"corrupt shard {url}: {error} (data.on_corrupt=skip trains on without it)") from None
        if isinstance(error, BadSample):
            self.samples += 1
            print(f"warning: replacing a sample of shard {url}: {error}", file=sys.stderr, flush=True)
        elif url not in self.shards:
            self.shards.add(url)
            print(f"warning: skipping the damaged part of shard {url}: {error}", file=sys.stderr, flush=True)


class EpochStream:
    """Samples of one source at positions of an epoch's order: its shards permuted by (seed, source, epoch)."""

    def __init__(self, plan: SourcePlan, seed: int, damage: Damage):
        self.plan, self.seed, self.damage = plan, seed, damage
        self._gen: Iterator[np.ndarray] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, position) the open generator yields next

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sample counts along it) of ``epoch``."""
        order = rng(self.seed, "shards", self.plan.index, epoch).permutation(len(self.plan.urls))
        return order, np.cumsum(np.asarray(self.plan.samples)[order])

    def read(self, epoch: int, pos: int, n: int) -> list[np.ndarray]:
        """Samples at positions [pos, pos + n) of ``epoch``; sequential reads reuse the open shard."""
        if self._next != (epoch, pos):
            if self._gen is not None:
                self._gen.close()
            self._gen = self._from(epoch, pos)
        out = [next(self._gen) for _ in range(n)]
        self._next = (epoch, pos + n)
        return out

    def _from(self, epoch: int, pos: int) -> Iterator[np.ndarray]:
        order, cum = self.layout(epoch)
        k = bisect.bisect_right(cum.tolist(), pos)
        skip = pos - (int(cum[k - 1]) if k else 0)
        while True:
            yield from self._shard_from(order, k % len(order), skip)
            k, skip = k + 1, 0

    def _shard_from(self, order: np.ndarray, k: int, skip: int) -> Iterator[np.ndarray]:
        shard = int(order[k])
        url, expected = self.plan.urls[shard], self.plan.samples[shard]
        position = skip
        while position < expected:
            try:
                for tokens in shard_samples(url, expected, self.plan.block, self.plan.dtype, start=position,
                                            vocab_size=self.plan.vocab_size):
                    yield tokens
                    position += 1
                return
            except BadSample as e:
                self.damage.record(url, e, self.plan.on_corrupt)
                yield from self._substitute(order, k, e.index, 1)
                position = e.index + 1
            except CorruptShard as e:
                self.damage.record(url, e, self.plan.on_corrupt)
                yield from self._substitute(order, k, position, expected - position)  # the holes [position, expected)
                return

    def _substitute(self, order: np.ndarray, k: int, first: int, count: int) -> Iterator[np.ndarray]:
        """For the samples at positions [first, first + count) of shard order[k]: those at the same positions
        (modulo its length) of the next readable shard after it."""
        for step in range(1, len(order) + 1):
            shard = int(order[(k + step) % len(order)])
            url = self.plan.urls[shard]
            try:
                samples = list(shard_samples(url, self.plan.samples[shard], self.plan.block, self.plan.dtype,
                                             vocab_size=self.plan.vocab_size))
            except CorruptShard as e:
                self.damage.record(url, e, self.plan.on_corrupt)
                continue
            for i in range(first, first + count):
                yield samples[i % len(samples)]
            return
        raise RuntimeError(f"{self.plan.name}: no training shard can be read")


class LaneReader:
    """Lane ``lane`` of ``lanes`` of one source: one sample per step, from a fixed segment of each epoch.

    Epoch e's order is cut into ``lanes`` segments of M = N // lanes samples; lane j reads segment
    j, permuted inside windows of ``window`` samples (seeded by the window's identity), so the
    sample of any step is found without reading what came before its window.
    """

    def __init__(self, plan: SourcePlan, lane: int, lanes: int, seed: int, window: int, damage: Damage):
        self.plan, self.lane, self.seed, self.window = plan, lane, seed, window
        self.per_epoch = plan.total // lanes
        self.stream = EpochStream(plan, seed, damage)

    def samples(self, start_step: int) -> Iterator[np.ndarray]:
        step = start_step
        while True:
            epoch, t = divmod(step, self.per_epoch)
            w0 = t - t % self.window
            n = min(self.window, self.per_epoch - w0)
            window = self.stream.read(epoch, self.lane * self.per_epoch + w0, n)
            perm = rng(self.seed, "window", self.plan.index, epoch, self.lane, w0).permutation(n)
            for i in range(t - w0, n):
                yield window[perm[i]]
            step += n - (t - w0)
