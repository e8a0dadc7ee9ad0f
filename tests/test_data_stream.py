"""The shards source: exact resume across world sizes and workers, SP groups, mixing, corrupt shards."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from psm_train.errors import DataError
from psm_train.data.manifest import write_manifest
from psm_train.data.shards import _write_shard
from psm_train.data.stream import ShardsConfig, ShardStream, row_sources

SEQ = 5  # samples hold SEQ + 1 tokens


def make_shards(out: Path, sizes: list[int], first_id: int = 0, val: int = 4, vocab_size: int = 1 << 20) -> Path:
    """Shards whose sample with unique id i holds tokens 16 i + [0, 1, ..., SEQ]: the order is observable."""
    out.mkdir(parents=True)
    splits, next_id = {}, first_id
    for split, split_sizes in (("train", sizes), ("val", [val])):
        shards = []
        for index, n in enumerate(split_sizes):
            ids = np.arange(next_id, next_id + n, dtype=np.uint32)
            blocks = ids[:, None] * 16 + np.arange(SEQ + 1, dtype=np.uint32)
            shards.append(_write_shard(str(out / f"{split}-%06d.tar"), index, next_id, blocks))
            next_id += n
        splits[split] = {"samples": sum(split_sizes), "tokens": sum(split_sizes) * SEQ, "shards": shards}
    write_manifest(out / "manifest.json", {"seq_len": SEQ, "dtype": "uint32", "vocab_size": vocab_size, "eot_id": 0,
                                           "tokenizer": {"file": "none", "sha256": "x", "kind": "test"}, "splits": splits})
    return out


def ids(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // 16).tolist()


def run(cfg: ShardsConfig, start: int, steps: int, batch: int, dp_size: int, seed: int = 3) -> list[list[int]]:
    """Global batches (sample ids, row order) of steps [start, start + steps) gathered from dp_size ranks."""
    per_rank = []
    for rank in range(dp_size):
        it = ShardStream(cfg, seed).train_batches(start, batch, rank, dp_size)
        per_rank.append([ids(next(it)[0]) for _ in range(steps)])
    return [sum((per_rank[r][s] for r in range(dp_size)), []) for s in range(steps)]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging."""
    def fail(*_):
        raise TimeoutError(f"no result within {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "a", [23, 9, 31, 17])  # unequal shards, 80 samples


def test_epoch_uses_each_sample_at_most_once_and_all_ranks_get_equal_batches(shards):
    steps_per_epoch = 80 // 8
    batches = run(ShardsConfig(manifests=[str(shards)], shuffle_window=4), 0, steps_per_epoch, 8, 1)
    seen = sum(batches, [])
    assert len(seen) == len(set(seen)) == 80
    # The next epoch reshuffles: same samples, another order; the stream never ends on any rank.
    again = sum(run(ShardsConfig(manifests=[str(shards)], shuffle_window=4), steps_per_epoch, steps_per_epoch, 8, 1), [])
    assert sorted(again) == sorted(seen) and again != seen


def test_resume_2x2_then_4x1_equals_uninterrupted(shards):
    # 6 rows per step: 80 // 6 = 13 steps per epoch, so 30 steps cross two epoch boundaries.
    cfg = dict(manifests=[str(shards)], shuffle_window=3)
    with deadline(60):
        reference = run(ShardsConfig(**cfg, workers=0), 0, 30, 12, 1)
        before = run(ShardsConfig(**cfg, workers=2), 0, 11, 12, 2)  # 2 ranks x 2 workers
        after = run(ShardsConfig(**cfg, workers=1), 11, 19, 12, 4)  # 4 ranks x 1 worker
    assert before + after == reference


def test_ranks_of_one_sequence_parallel_group_get_identical_batches(shards):
    cfg = ShardsConfig(manifests=[str(shards)], workers=2)
    a = ShardStream(cfg, 0).train_batches(5, 8, 1, 2)
    b = ShardStream(cfg, 0).train_batches(5, 8, 1, 2)
    for _ in range(4):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.int64 and xa.shape == (4, SEQ)


def test_targets_are_the_next_tokens(shards):
    inputs, targets = next(ShardStream(ShardsConfig(manifests=[str(shards)]), 0).train_batches(0, 4))
    assert inputs.shape == targets.shape == (4, SEQ)
    assert torch.equal(targets, inputs + 1)


def test_mixing_weights_give_whole_rows_per_batch(tmp_path):
    a = make_shards(tmp_path / "a", [40])
    b = make_shards(tmp_path / "b", [40], first_id=1000)
    assert row_sources([3.0, 1.0], 8).count(1) == 2
    cfg = ShardsConfig(manifests=[str(a), str(b)], weights=[3.0, 1.0])
    for batch in run(cfg, 0, 3, 8, 2):
        assert sum(i >= 1000 for i in batch) == 2


def test_cursor_is_world_size_independent_and_checked(shards):
    source = ShardStream(ShardsConfig(manifests=[str(shards)]), 3)
    cursor = source.cursor(17, 8)
    assert cursor["sources"][0]["epoch"] == 1 and cursor["sources"][0]["step_in_epoch"] == 7
    assert source.check_cursor(cursor, 8) == 17
    with pytest.raises(ValueError, match="global_batch_size"):
        source.check_cursor(cursor, 16)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def test_truncated_shard_is_found_before_training(tmp_path):
    out = make_shards(tmp_path / "s", [20, 20, 20])
    truncate(out / "train-000001.tar")
    with pytest.raises(DataError, match="train-000001.tar"):
        ShardStream(ShardsConfig(manifests=[str(out)]), 0)
    source = ShardStream(ShardsConfig(manifests=[str(out)], on_corrupt="skip"), 0)
    assert source.metrics() == {"data/skipped_shards": 1.0, "data/skipped_samples": 0.0}
    seen = sum(run(ShardsConfig(manifests=[str(out)], on_corrupt="skip"), 0, 10, 4, 1), [])
    assert not set(seen) & set(range(20, 40))


def test_sha256_mismatch_is_reported_before_training(tmp_path):
    out = make_shards(tmp_path / "s", [20, 20])
    data = bytearray((out / "train-000000.tar").read_bytes())
    data[600] ^= 1  # same size, other content
    (out / "train-000000.tar").write_bytes(bytes(data))
    ShardStream(ShardsConfig(manifests=[str(out)], verify="size"), 0)
    with pytest.raises(DataError, match=r"train-000000.tar: sha256"):
        ShardStream(ShardsConfig(manifests=[str(out)], verify="sha256"), 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_while_streaming_errors_or_is_skipped_without_hanging(tmp_path, workers):
    out = make_shards(tmp_path / "s", [20, 20, 20])
    truncate(out / "train-000002.tar")  # found only while reading: verify=none
    cfg = dict(manifests=[str(out)], verify="none", workers=workers)
    with deadline(60):
        with pytest.raises(RuntimeError, match="corrupt shard .*train-000002.tar"):
            stream = ShardStream(ShardsConfig(**cfg), 0).train_batches(0, 4)
            for _ in range(15):
                next(stream)
        source = ShardStream(ShardsConfig(**cfg, on_corrupt="skip"), 0)
        stream = source.train_batches(0, 4)
        batches = [ids(next(stream)[0]) for _ in range(30)]  # two epochs, every step answered
    assert len(batches) == 30 and source.metrics()["data/skipped_shards"] >= 1


def test_pipe_and_file_urls_give_the_local_stream(shards):
    # pipe: cannot seek, so lanes starting inside a shard skip by reading: the same samples either way.
    local = run(ShardsConfig(manifests=[str(shards)]), 4, 3, 8, 1)
    for base in (f"pipe:cat {shards}", f"file://{shards}"):
        assert run(ShardsConfig(manifests=[str(shards)], base_urls=[base]), 4, 3, 8, 1) == local


def poison_sample(path: Path, sample_id: int) -> None:
    """Overwrite one token of the sample with unique id ``sample_id`` by an id far outside the vocabulary;
    the file keeps its size (so verify=size passes) and its tar structure."""
    data = bytearray(path.read_bytes())
    tokens = (sample_id * 16 + np.arange(SEQ + 1, dtype=np.uint32)).tobytes()
    at = data.find(tokens)
    assert at > 0 and data.find(tokens, at + 1) < 0
    size = len(data)
    data[at + 8:at + 12] = np.uint32(0xFFFF_FFF0).tobytes()  # the sample's third token
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


@pytest.mark.parametrize("workers", [0, 2])
def test_out_of_vocabulary_token_is_refused_or_only_that_sample_is_replaced(tmp_path, workers, capfd):
    out = make_shards(tmp_path / "s", [20, 20, 20], vocab_size=2000)  # ids up to 16 * 64 + 5 fit
    poison_sample(out / "train-000001.tar", 27)  # sample 7 of shard 1 (key 0000000027)
    cfg = dict(manifests=[str(out)], workers=workers, shuffle_window=4)
    with deadline(60):
        with pytest.raises(RuntimeError, match=r"corrupt shard .*train-000001.tar: sample 7 \(key 0000000027\) holds "
                                               r"token id 4294967280, outside the vocabulary \[0, 2000\)"):
            stream = ShardStream(ShardsConfig(**cfg), 0).train_batches(0, 4)
            for _ in range(15):
                next(stream)
        source = ShardStream(ShardsConfig(**cfg, on_corrupt="skip"), 0)
        stream = source.train_batches(0, 4)
        batches = [next(stream)[0] for _ in range(15)]  # one epoch: every sample, the bad one replaced
        assert all(int(b.max()) < 2000 for b in batches)
        seen = sum((ids(b) for b in batches), [])
        assert 27 not in seen and len(seen) == 60 and len(set(seen)) == 59  # the substitute appears twice
        assert source.metrics()["data/skipped_samples"] == 1.0
        assert "replacing a sample of shard" in capfd.readouterr().err
        # A resumed run replaces it the same way, wherever it starts.
        skip = ShardsConfig(**{**cfg, "workers": 0}, on_corrupt="skip")
        assert run(skip, 0, 15, 4, 1, seed=0) == [ids(b) for b in batches]
        for start in (3, 8):
            assert run(skip, 0, start, 4, 1, seed=0) + run(skip, start, 15 - start, 4, 2, seed=0) == [ids(b) for b in batches]


def test_out_of_vocabulary_token_in_validation_shard(tmp_path):
    out = make_shards(tmp_path / "s", [20], val=6, vocab_size=2000)
    poison_sample(out / "val-000000.tar", 22)  # val ids start after the 20 training samples
    with pytest.raises(RuntimeError, match=r"val-000000.tar: sample 2 \(key 0000000022\)"):
        ShardStream(ShardsConfig(manifests=[str(out)]), 0).eval_sets(1, 6)
    (inputs, _), = ShardStream(ShardsConfig(manifests=[str(out)], on_corrupt="skip"), 0).eval_sets(1, 6)[SEQ]
    assert ids(inputs) == [20, 21, 23, 24, 25]
