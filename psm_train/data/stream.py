"""The ``shards`` data source: language modelling on webdataset shards built by ``psm-train data build``.

Order. The G rows of every global batch are dealt to the sources by weight (whole rows,
interleaved); source k's G_k rows are its lanes. In epoch e the source's shards, permuted by
(seed, k, e), form one stream of N_k samples; lane j reads the segment [j*M_k, (j+1)*M_k),
M_k = N_k // G_k, one sample per step, shuffled within windows (see LaneReader). Row j of step s
is therefore a function of (seed, G, s) alone: not of ranks, workers or history. Resuming at
step s needs only s; every rank gets M_k batches per epoch (no rank runs dry first); the
N_k mod G_k samples left over by an epoch are a different few in each epoch.

Split. Data-parallel rank r takes rows [r*b, (r+1)*b), b = G / dp_size, and opens only the shards
under its lanes' segments. Each DataLoader worker takes a contiguous part of those rows and
yields that part of every step's batch already stacked (per-sample transfer is slow); the
DataLoader returns workers' parts round-robin, in worker order, and they are concatenated here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from psm_train.errors import DataError
from psm_train.data.manifest import Manifest, check_shard, load_manifest
from psm_train.data.shard_reader import BadSample, CorruptShard, Damage, LaneReader, SourcePlan, shard_samples
from psm_train.data.source import Batch

CURSOR_VERSION = 1


@dataclass
class ShardsConfig:
    """Token shards; every position is scored (targets are the inputs shifted by one)."""

    manifests: list[str] = field(default_factory=list)  # manifest.json or its directory, one per source
    weights: list[float] = field(default_factory=list)  # mixing weights (default equal), as whole rows of each batch
    base_urls: list[str] = field(default_factory=list)  # per source, where its shards are (default: beside the manifest); file://, pipe:, http(s)://
    seq_len: int = 0  # 0: the shards' length; otherwise it must equal it
    shuffle_window: int = 64  # samples of a lane shuffled together
    workers: int = 0  # DataLoader worker processes per rank (at most the rank's rows are used)
    prefetch: int = 4  # steps each worker prepares ahead
    on_corrupt: str = "error"  # error: stop, naming the shard | skip: warn, count, train on without it
    verify: str = "size"  # before training: none | size | sha256 of every local shard against the manifest

    def validate(self) -> None:
        if not self.manifests:
            raise ValueError("manifests: expected at least one manifest path (written by `psm-train data build --out DIR`)")
        for name in ("weights", "base_urls"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.manifests):
                raise ValueError(f"{name}: expected one entry per manifest ({len(self.manifests)}), got {len(getattr(self, name))}")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"weights: expected positive numbers, got {self.weights}")
        if self.seq_len < 0 or self.workers < 0:
            raise ValueError("seq_len and workers: expected integers >= 0")
        if self.shuffle_window < 1 or self.prefetch < 1:
            raise ValueError("shuffle_window and prefetch: expected positive integers")
        if self.on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt: expected error or skip, got {self.on_corrupt!r}")
        if self.verify not in ("none", "size", "sha256"):
            raise ValueError(f"verify: expected none, size or sha256, got {self.verify!r}")


def row_sources(weights: list[float], rows: int) -> list[int]:
    """The source of each row: smooth weighted round-robin, so every rank's rows mix the sources."""
    credit = [0.0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(rows):
        credit = [c + w for c, w in zip(credit, weights)]
        k = max(range(len(weights)), key=lambda i: credit[i])
        credit[k] -= total
        out.append(k)
    return out


def shard_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


class _RankRows(torch.utils.data.IterableDataset):
    """One rank's rows of every step from ``start_step`` on; in a worker, that worker's part of them."""

    def __init__(self, plans: list[SourcePlan], lanes: list[tuple[int, int, int]], seed: int, window: int, start_step: int):
        super().__init__()
        self.plans, self.lanes, self.seed, self.window, self.start_step = plans, lanes, seed, window, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.lanes[wid * len(self.lanes) // workers:(wid + 1) * len(self.lanes) // workers]
        damage = Damage()
        readers = [LaneReader(self.plans[k], lane, lanes, self.seed, self.window, damage).samples(self.start_step)
                   for k, lane, lanes in mine]
        block = self.plans[0].block
        while True:
            rows = np.empty((len(readers), block), dtype=np.int32)
            for i, reader in enumerate(readers):
                rows[i] = next(reader)
            yield torch.from_numpy(rows), len(damage.shards), damage.samples


class ShardStream:
    """The DataSource of ``data.task: shards`` (see the module docstring for order and resume)."""

    def __init__(self, cfg: ShardsConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.manifests = []
        for i, path in enumerate(cfg.manifests):
            try:
                self.manifests.append(load_manifest(path))
            except FileNotFoundError as e:
                raise DataError(f"data.manifests[{i}]: {e}") from None
        first = self.manifests[0]
        for m in self.manifests[1:]:
            for attr in ("seq_len", "vocab_size", "dtype"):
                if getattr(m, attr) != getattr(first, attr):
                    raise DataError(f"data.manifests: {m.path} has {attr} {getattr(m, attr)}, {first.path} has {getattr(first, attr)}; sources must share them")
            if m.tokenizer["sha256"] != first.tokenizer["sha256"]:
                raise DataError(f"data.manifests: {m.path} and {first.path} were tokenized differently (tokenizer sha256 differs)")
        if cfg.seq_len and cfg.seq_len != first.seq_len:
            raise DataError(f"data.seq_len: {cfg.seq_len}, but the shards of {first.path} hold {first.seq_len}-token sequences "
                            f"(set data.seq_len=0 or rebuild with --seq-len {cfg.seq_len})")
        self.seq_len = first.seq_len
        self.vocab_size = first.vocab_size
        self.sparse_targets = False
        self.class_groups = None
        self.recall_distance = None
        self.weights = cfg.weights or [1.0] * len(self.manifests)
        self.skipped: dict[int, list[str]] = {}  # source -> shard names left out before training
        self.plans = [self._plan(i, m, "train") for i, m in enumerate(self.manifests)]
        self.val_plan = self._plan(0, first, "val")
        self._worker_damage: list[tuple[int, int]] = []  # per worker: (damaged shards, replaced samples)

    def _base(self, i: int, m: Manifest) -> str:
        return self.cfg.base_urls[i] if self.cfg.base_urls else str(m.path.parent)

    def _plan(self, i: int, m: Manifest, split: str) -> SourcePlan:
        """The split's shards that pass the pre-training check (all of them, or an error, under on_corrupt=error)."""
        kept, bad = [], []
        for shard in m.shards(split):
            url = shard_url(self._base(i, m), shard.name)
            problem = check_shard(m, shard, url, self.cfg.verify)
            if problem:
                bad.append((shard.name, f"{url}: {problem}"))
            else:
                kept.append((url, shard.samples))
        if bad and self.cfg.on_corrupt == "error":
            raise DataError(f"data.verify={self.cfg.verify}: {len(bad)} shard(s) do not match {m.path}: "
                            + "; ".join(why for _, why in bad[:3]) + " (rebuild them, or set data.on_corrupt=skip to train without them)")
        for name, why in bad:
            print(f"warning: leaving out shard {why}", file=sys.stderr, flush=True)
            self.skipped.setdefault(i, []).append(name)
        if not kept:
            raise DataError(f"{m.path}: no readable {split} shard")
        urls, samples = zip(*kept)
        return SourcePlan(i, str(m.path), urls, samples, m.seq_len + 1, m.dtype, self.cfg.on_corrupt, m.vocab_size)

    def lanes(self, global_batch_size: int) -> list[tuple[int, int, int]]:
        """(source, lane, lanes of that source) of every row of a global batch."""
        sources = row_sources(self.weights, global_batch_size)
        counts = [sources.count(k) for k in range(len(self.plans))]
        for k, plan in enumerate(self.plans):
            if counts[k] == 0:
                raise DataError(f"data.weights: source {plan.name} gets no row of a {global_batch_size}-row batch; raise its weight or the batch size")
            if plan.total < counts[k]:
                raise DataError(f"{plan.name}: {plan.total} training samples cannot fill {counts[k]} rows per batch")
        seen = [0] * len(self.plans)
        out = []
        for k in sources:
            out.append((k, seen[k], counts[k]))
            seen[k] += 1
        return out

    def train_batches(self, start_step: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
        if global_batch_size % dp_size:
            raise ValueError(f"train.batch_size {global_batch_size} is not divisible by the {dp_size} data-parallel ranks")
        rows = global_batch_size // dp_size
        lanes = self.lanes(global_batch_size)[dp_rank * rows:(dp_rank + 1) * rows]
        dataset = _RankRows(self.plans, lanes, self.seed, self.cfg.shuffle_window, start_step)
        workers = min(self.cfg.workers, rows)
        self._worker_damage = [(0, 0)] * max(workers, 1)
        if workers == 0:
            parts = iter(dataset)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=self.cfg.prefetch)
            parts = iter(loader)
        while True:
            chunks = []
            for w in range(len(self._worker_damage)):
                rows_part, shards, samples = next(parts)
                chunks.append(rows_part)
                self._worker_damage[w] = (int(shards), int(samples))
            tokens = torch.cat(chunks).long()
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def metrics(self) -> dict[str, float]:
        """data/skipped_shards: left out before training plus damaged ones met by this rank's readers;
        data/skipped_samples: samples with out-of-vocabulary token ids this rank's readers replaced."""
        return {"data/skipped_shards": float(sum(len(v) for v in self.skipped.values()) + sum(d[0] for d in self._worker_damage)),
                "data/skipped_samples": float(sum(d[1] for d in self._worker_damage))}

    def cursor(self, step: int, global_batch_size: int) -> dict:
        lanes = self.lanes(global_batch_size)
        out = []
        for k, (m, plan) in enumerate(zip(self.manifests, self.plans)):
            per_epoch = plan.total // sum(1 for src, _, _ in lanes if src == k)
            out.append({"manifest_sha256": m.sha256, "skipped_shards": sorted(self.skipped.get(k, [])),
                        "epoch": step // per_epoch, "step_in_epoch": step % per_epoch})
        return {"version": CURSOR_VERSION, "kind": "shards", "seed": self.seed, "step": step,
                "global_batch_size": global_batch_size, "weights": list(self.weights), "sources": out}

    def check_cursor(self, cursor: dict, global_batch_size: int) -> int:
        """The step to resume at from a checkpoint's cursor; ValueError if this data would continue differently."""
        expected = self.cursor(cursor.get("step", 0), global_batch_size)
        for key in ("version", "kind", "seed", "global_batch_size", "weights", "sources"):
            if cursor.get(key) != expected[key]:
                raise ValueError(f"data cursor: {key} is {cursor.get(key)!r} in the checkpoint but {expected[key]!r} now; "
                                 "resuming would not continue the same sample order")
        return int(cursor["step"])

    def eval_sets(self, batches: int, batch_size: int) -> dict[int, list[Batch]]:
        """The first batches * batch_size validation samples of the first source, in shard order."""
        plan, damage, samples = self.val_plan, Damage(), []
        wanted = batches * batch_size
        for url, count in zip(plan.urls, plan.samples):
            start = 0
            while start < count and len(samples) < wanted:
                try:
                    for tokens in shard_samples(url, count, plan.block, plan.dtype, start, plan.vocab_size):
                        samples.append(tokens)
                        if len(samples) == wanted:
                            break
                    break
                except BadSample as e:  # left out; the shard's later samples are read
                    damage.record(url, e, plan.on_corrupt)
                    start = e.index + 1
                except CorruptShard as e:
                    damage.record(url, e, plan.on_corrupt)
                    break
            if len(samples) == wanted:
                break
        if not samples:
            raise DataError(f"{plan.name}: the validation shards hold no readable sample")
        tokens = torch.from_numpy(np.stack(samples).astype(np.int64))
        return {self.seq_len: [(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in tokens.split(batch_size)]}
