"""CheckpointStore: round trips, retention, asynchrony, corruption fallback and crash safety.

Ranks are simulated by several stores on one directory (publishing goes through the filesystem,
so that is the real protocol); crash tests SIGKILL child processes at each named point.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_map

from psm_train.checkpoint import CheckpointError, CheckpointStore, CheckpointWriteError
from psm_train.checkpoint import store as store_mod


@pytest.fixture(autouse=True)
def _no_crash_injection(monkeypatch):
    monkeypatch.delenv("PSM_TRAIN_CKPT_CRASH_AT", raising=False)


def save_all(stores, step, shards, meta=None):
    """Every rank saves (rank 0 last, as the slowest rank would), then all wait."""
    for store in reversed(stores):
        store.save(step, shards[store.rank], meta if meta is not None else {"step": step})
    for store in stores:
        store.wait()


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def shard_for(rank):
    param = torch.nn.Parameter(torch.randn(3, 4))
    return {
        "model": {"w": param, "col": torch.arange(12.0).view(3, 4)[:, 1], "half": torch.ones(2, dtype=torch.bfloat16)},
        "optim": {"step": 7 + rank, "lr": 3e-4, "betas": (0.9, 0.95), "groups": [{"name": "decay", "ids": [0, 1]}]},
        "rng": b"\x00\x01", "dtype": torch.float16, "note": f"rank {rank}", "none": None,
    }


def expected_of(shard):
    """What read() must return: the same values, tensors as detached clones."""
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, shard)


@pytest.mark.parametrize("world_size", [1, 3])
def test_round_trip(tmp_path, monkeypatch, world_size):
    gate = threading.Event()
    write = store_mod._write_shard
    monkeypatch.setattr(store_mod, "_write_shard", lambda *a: (gate.wait(), write(*a))[1])
    stores = [CheckpointStore(tmp_path, r, world_size) for r in range(world_size)]
    shards = [shard_for(r) for r in range(world_size)]
    expected = [expected_of(s) for s in shards]
    for store in reversed(stores):
        store.save(5, shards[store.rank], {"step": 5, "tokens": 1234, "config": {"lr": 3e-4}})
    with torch.no_grad():  # the writers have not started: only the staged copies protect the checkpoint
        for shard in shards:
            shard["model"]["w"].add_(100.0)
    gate.set()
    for store in stores:
        store.close()

    checkpoint = CheckpointStore(tmp_path, 0, 1).load()
    assert (checkpoint.step, checkpoint.world_size, checkpoint.skipped) == (5, world_size, [])
    assert checkpoint.meta == {"step": 5, "tokens": 1234, "config": {"lr": 3e-4}}
    for r in range(world_size):
        got = checkpoint.read(r)
        assert_same(got, expected[r])
        assert got["model"]["col"].is_contiguous() and not got["model"]["w"].requires_grad
    with pytest.raises(ValueError, match=f"{world_size} ranks"):
        checkpoint.read(world_size)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000000005"]
    assert (tmp_path / "latest").read_text().strip() == "step_000000005"
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(["meta.json"] + [f"rank{r:05d}.pt" for r in range(world_size)])
    assert sorted(os.listdir(checkpoint.path)) == sorted(["manifest.json", *manifest["files"]])


def test_unloadable_values_and_bad_arguments_fail_at_the_call(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointStore(tmp_path, 0, 1, keep_last=0)
    store = CheckpointStore(tmp_path, 0, 1)
    with pytest.raises(TypeError, match=r"shard\['rng'\]\[0\]: a ndarray"):
        store.save(1, {"rng": [np.zeros(3)]}, {})
    with pytest.raises(TypeError, match="not JSON serializable"):
        store.save(1, {}, {"bad": object()})
    store.close()
    assert store.complete_steps() == []


def test_retention(tmp_path):
    store = CheckpointStore(tmp_path, 0, 1, keep_last=2, keep_every=3)
    store.save(1, {"x": 1}, {})
    store.wait()
    (tmp_path / ".tmp_step_000000000").mkdir()  # a crashed older save: removed by the next publish
    (tmp_path / ".tmp_step_000000009").mkdir()  # a newer save another rank may be writing: left alone
    for step in range(2, 8):
        store.save(step, {"x": step}, {})
    store.close()
    assert store.complete_steps() == [3, 6, 7]
    assert sorted(p.name for p in tmp_path.glob(".tmp_*")) == [".tmp_step_000000009"]
    assert store.load(3).read(0) == {"x": 3}


def test_save_is_asynchronous(tmp_path, monkeypatch):
    write = store_mod._write_shard
    monkeypatch.setattr(store_mod, "_write_shard", lambda *a: (time.sleep(0.5), write(*a))[1])
    store = CheckpointStore(tmp_path, 0, 1)
    start = time.perf_counter()
    blocked = store.save(1, {"w": torch.zeros(1000)}, {})
    assert blocked < 0.25 and time.perf_counter() - start < 0.25
    assert store.complete_steps() == []  # still writing
    blocked = store.save(2, {"w": torch.ones(1000)}, {})  # waits for step 1 to be published
    assert blocked >= 0.3
    assert store.complete_steps() == [1]
    store.wait()
    assert store.complete_steps() == [1, 2]


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_writer_errors_surface_once(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_write_shard", lambda *a: disk_full())
    store = CheckpointStore(tmp_path, 0, 1)
    store.save(1, {}, {})
    with pytest.raises(CheckpointWriteError, match="No space left"):
        store.wait()
    store.save(2, {}, {})
    with pytest.raises(CheckpointWriteError, match="step 2"):  # not waited for: the next save reports it
        store.save(3, {}, {})
    monkeypatch.undo()
    store.save(4, {}, {})
    store.close()
    assert store.complete_steps() == [4]


def wait_for_failure(store: CheckpointStore) -> None:
    """Until the writer thread has finished its job (without check(), which would consume the error)."""
    store._pending.exception(timeout=30)


def test_full_disk_is_reported_at_once_then_stops_the_next_step(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(store_mod._HashingWriter, "write", lambda self, data: disk_full())
    store = CheckpointStore(tmp_path, 0, 1)
    store.save(5, {"w": torch.ones(100)}, {"step": 5})
    wait_for_failure(store)
    err = capfd.readouterr().err
    shard = tmp_path / ".tmp_step_000000005" / "rank00000.pt"
    assert f"checkpoint of step 5 not saved: writing {shard} failed: OSError: [Errno 28] No space left on device" in err
    assert "training stops at the next step" in err
    assert not shard.exists()  # its space is freed
    with pytest.raises(CheckpointWriteError, match=rf"step 5 not saved: writing {shard} failed: .*Errno 28"):
        store.check()  # what the loop calls once per step
    store.check()  # raised once
    assert store.failed_saves == 1 and store.complete_steps() == []
    store.close()


def test_continue_policy_trains_on_and_later_saves_publish(tmp_path, monkeypatch, capfd):
    write = store_mod._HashingWriter.write
    monkeypatch.setattr(store_mod._HashingWriter, "write", lambda self, data: disk_full())
    store = CheckpointStore(tmp_path, 0, 1, on_save_error="continue")
    store.save(5, {"w": torch.ones(100)}, {"step": 5})
    wait_for_failure(store)
    store.check()  # no error: reported on stderr only
    assert "training goes on" in capfd.readouterr().err
    monkeypatch.setattr(store_mod._HashingWriter, "write", write)  # space freed
    store.save(10, {"w": torch.ones(100)}, {"step": 10})
    store.close()
    assert store.complete_steps() == [10] and store.failed_saves == 1
    with pytest.raises(ValueError, match="on_save_error must be stop or continue"):
        CheckpointStore(tmp_path, 0, 1, on_save_error="ignore")


def test_failed_rank_stops_rank_zero_waiting(tmp_path, monkeypatch, capfd):
    rank0 = CheckpointStore(tmp_path, 0, 2, publish_timeout_s=60)
    rank1 = CheckpointStore(tmp_path, 1, 2)
    write = store_mod._write_shard
    monkeypatch.setattr(store_mod, "_write_shard", lambda path, shard, rank: disk_full() if rank == 1 else write(path, shard, rank))
    started = time.monotonic()
    save_all_failing = [rank1.save(3, {"v": 1}, {}), rank0.save(3, {"v": 0}, {})]
    assert len(save_all_failing) == 2
    with pytest.raises(CheckpointWriteError, match="step 3 not published: rank 1: checkpoint of step 3 not saved"):
        rank0.wait()
    assert time.monotonic() - started < 30  # not publish_timeout_s
    with pytest.raises(CheckpointWriteError, match="rank00001.pt failed"):
        rank1.wait()
    assert rank0.complete_steps() == [] and not (tmp_path / ".tmp_step_000000003").exists()


def test_staging_reuses_one_buffer_per_tensor_across_saves(tmp_path):
    store = CheckpointStore(tmp_path, 0, 1, keep_last=3)
    w = torch.arange(6.0).reshape(2, 3)
    store.save(1, {"w": w.t(), "b": torch.zeros(4)}, {})  # a transposed view: staged contiguous
    buffers = dict(store.staging.buffers)
    w.add_(10)
    store.save(2, {"w": w.t(), "b": torch.ones(4)}, {})
    assert {k: id(v) for k, v in store.staging.buffers.items()} == {k: id(v) for k, v in buffers.items()}
    store.save(3, {"w": torch.zeros(5)}, {})  # another shape: a new buffer; unused ones are dropped
    assert [k[1] for k in store.staging.buffers] == [(5,)]
    store.close()
    assert torch.equal(store.load(1).read(0)["w"], torch.arange(6.0).reshape(2, 3).t())
    assert torch.equal(store.load(2).read(0)["w"], torch.arange(6.0).reshape(2, 3).t() + 10)
    assert torch.equal(store.load(2).read(0)["b"], torch.ones(4)) and store.load(2).read(0)["w"].is_contiguous()
    assert torch.equal(store.load(2).read(0, mmap=True)["w"], store.load(2).read(0)["w"])


def test_non_finite_checkpoints_are_skipped_and_never_push_out_good_ones(tmp_path):
    store = CheckpointStore(tmp_path, 0, 1, keep_last=2)
    for step in (1, 2):
        store.save(step, {"w": torch.full((3,), float(step))}, {"step": step})  # no field: accepted
    for step in (3, 4, 5):
        store.save(step, {"w": torch.full((3,), float("nan"))}, {"step": step, "finite": False})
    store.close()
    assert store.complete_steps() == [1, 2, 5]  # the two good ones stay; of the bad ones only the newest
    with pytest.warns(UserWarning, match=r"step_000000005: saved with non-finite values"):
        checkpoint = store.load()
    assert checkpoint.step == 2 and checkpoint.skipped == ["step_000000005: saved with non-finite values (meta.json: finite false)"]
    with pytest.raises(CheckpointError, match="non-finite"):
        store.load(5)


def test_restart_discards_unpublished_shards(tmp_path):
    """A crashed save leaves rank 1's shard and .done record; the re-save of that step must not publish them."""
    rank0, rank1 = CheckpointStore(tmp_path, 0, 2), CheckpointStore(tmp_path, 1, 2)
    save_all([rank0, rank1], 1, [{"v": 1}, {"v": 1}])
    rank1.save(2, {"v": "stale"}, {})  # rank 0 "crashes" before saving step 2
    rank1.wait()
    with pytest.warns(UserWarning, match="removed .tmp_step_000000002: a save"):
        rank0 = CheckpointStore(tmp_path, 0, 2)  # the restarted job
    rank1 = CheckpointStore(tmp_path, 1, 2)
    rank0.save(2, {"v": 2}, {})
    time.sleep(0.2)
    assert rank0.complete_steps() == [1]  # waiting for rank 1, not trusting the old record
    rank1.save(2, {"v": 2}, {})
    rank0.wait()
    assert rank0.load().read(1) == {"v": 2}


def test_corruption_falls_back_to_previous(tmp_path):
    stores = [CheckpointStore(tmp_path, r, 2, keep_last=3) for r in range(2)]
    for step in (1, 2, 3):
        save_all(stores, step, [{"w": torch.full((64,), float(step))}] * 2)
    rank_file = tmp_path / "step_000000003" / "rank00001.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_000000003: rank00001.pt does not match its sha256"):
        checkpoint = stores[0].load()
    assert checkpoint.step == 2 and torch.equal(checkpoint.read(1)["w"], torch.full((64,), 2.0))
    assert checkpoint.skipped == ["step_000000003: rank00001.pt does not match its sha256 in the manifest"]
    with pytest.raises(CheckpointError, match="sha256"):
        stores[0].load(3)

    manifest = tmp_path / "step_000000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable manifest.json"):
        checkpoint = stores[0].load()
    assert checkpoint.step == 1 and len(checkpoint.skipped) == 2 and "step_000000002" in checkpoint.skipped[1]

    (tmp_path / "step_000000001" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no usable checkpoint.*meta.json is missing"):
        stores[0].load()
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=f"{empty}: no usable checkpoint"):
        CheckpointStore(empty, 0, 1).load()


# A rank of a job: saves step 1, then step 2 with PSM_TRAIN_CKPT_CRASH_AT set. It says "ready" once its store
# exists and waits for a line on stdin, so that every rank's store exists before any rank saves.
CHILD = """
import os, sys, torch
from psm_train.checkpoint import CheckpointStore
root, rank, world_size, crash_at, timeout = sys.argv[1:]
rank = int(rank)
store = CheckpointStore(root, rank, int(world_size), publish_timeout_s=float(timeout))
print("ready", flush=True)
sys.stdin.readline()
store.save(1, {"w": torch.full((4096,), 1.0), "rank": rank}, {"step": 1})
store.wait()
os.environ["PSM_TRAIN_CKPT_CRASH_AT"] = crash_at
store.save(2, {"w": torch.full((4096,), 2.0), "rank": rank}, {"step": 2})
store.wait()
"""


def run_ranks(root: Path, world_size: int, crash_at: str, timeout: float = 60.0) -> list[subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "PSM_TRAIN_CKPT_CRASH_AT"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(r), str(world_size), crash_at, str(timeout)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world_size)]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.communicate()[1]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.parametrize("point", ["before_shard", "mid_shard", "after_shard", "before_manifest", "before_rename",
                                   "before_latest"])
def test_crash_leaves_a_loadable_checkpoint(tmp_path, point):
    (child,) = run_ranks(tmp_path, 1, point)
    assert child.returncode == -9, child.stderr
    if point in ("mid_shard", "after_shard"):
        assert (tmp_path / ".tmp_step_000000002" / "rank00000.pt").stat().st_size > 0
    published = 2 if point == "before_latest" else 1  # there only `latest` is stale; the listing is the truth
    assert (tmp_path / "latest").read_text().strip() == "step_000000001"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = CheckpointStore(tmp_path, 0, 1)  # the restarted job
    removed = [w for w in caught if "removed .tmp_step_000000002: a save" in str(w.message)]
    assert len(removed) == (0 if point == "before_latest" else 1)  # before_latest: already renamed, nothing unfinished
    assert not list(tmp_path.glob(".tmp_*"))
    checkpoint = store.load()
    assert (checkpoint.step, checkpoint.skipped) == (published, [])
    assert torch.equal(checkpoint.read(0)["w"], torch.full((4096,), float(published)))
    store.save(2, {"w": torch.full((4096,), 3.0)}, {"step": 2})  # redo step 2 (replacing it after before_latest)
    store.close()
    assert torch.equal(store.load().read(0)["w"], torch.full((4096,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000000001", "step_000000002"]


def test_rank_crash_times_out_the_publish(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, 2, "mid_shard:1", timeout=2.0)
    assert rank1.returncode == -9, rank1.stderr
    assert rank0.returncode == 1
    assert "CheckpointError" in rank0.stderr and "step 2 not published" in rank0.stderr
    assert "ranks [1] have not finished" in rank0.stderr
    with pytest.warns(UserWarning, match="removed .tmp_step_000000002: a save"):
        store = CheckpointStore(tmp_path, 0, 2)
    checkpoint = store.load()
    assert (checkpoint.step, checkpoint.world_size) == (1, 2)
    assert checkpoint.read(1)["rank"] == 1
