"""One checkpoint = one file per rank + meta.json + manifest.json, published atomically by rank 0.

Layout under ``root``::

    step_000001200/           published: visible only once complete (a directory rename)
        rank00000.pt ...      one torch.save file per rank: whatever dict the caller gave save()
        meta.json             rank 0's meta dict
        manifest.json         written last: step, world_size, size and sha256 of every file
    .tmp_step_000001400/      a save in progress (or one that crashed): never read by load()
    latest                    the newest published directory's name, for people and tools

Saves are asynchronous: save() copies the shard to CPU and returns; a background thread per rank
writes it and drops a ``rank{r}.done`` record. Rank 0's thread waits on the filesystem for every
rank's record, writes the manifest, renames the directory into place and applies retention. So
publishing needs no collective and a crash at any point leaves either the old set of checkpoints
or the new one, never a half-written ``step_*`` directory that load() would trust.

The copy goes into CPU buffers allocated by the first save and reused by later ones (pinned for
CUDA tensors: the device-to-host copies are issued asynchronously and waited for once).

A failed background write (a full disk, say) is printed on stderr at once, with the step and the
path, leaves a ``rank{r}.failed`` record instead of ``.done`` (so rank 0 gives up at once instead of
waiting for it), and is raised as CheckpointWriteError by the next save() or check(), unless the
store was made with on_save_error='continue'.

A checkpoint whose meta holds ``"finite": false`` is never loaded by load() and never counts
towards keep_last, so a run whose state went non-finite cannot push out its last good checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psm_train.errors import RunStopped

VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{9,})")
_TMP_DIR = re.compile(r"\.tmp_step_(\d{9,})")  # prefix match: also covers the ".old" of a replaced step
_LEAVES = (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)  # what weights_only=True loads back


class CheckpointError(RuntimeError):
    """A checkpoint could not be published (a rank never finished) or does not match its manifest."""


class CheckpointWriteError(CheckpointError, RunStopped):
    """A background write failed; the message names the step, the path and the OS error."""


def _crash_point(point: str, rank: int) -> None:
    """Fault injection for tests: PSM_TRAIN_CKPT_CRASH_AT=<point>[:<rank>] SIGKILLs this process at <point>."""
    spec = os.environ.get("PSM_TRAIN_CKPT_CRASH_AT", "")
    name, _, only_rank = spec.partition(":")
    if name == point and (not only_rank or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def _step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _done_file(rank: int) -> str:
    return f"rank{rank:05d}.done"


def _failed_file(rank: int) -> str:
    return f"rank{rank:05d}.failed"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_durable(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_durable(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StagingBuffers:
    """The CPU copies a save hands its writer thread, reused by the next save.

    A tensor is copied into the buffer of its place in the shard (e.g. ``shard['engine']['params']['w']``), its
    shape and dtype, made by the first save that needed it: pinned when the tensor is on a GPU, so that all
    copies are issued with non_blocking and waited for by one synchronize per device. Buffers a save did not
    use are dropped. Only reuse them after the previous save's writer is done (save() waits for it first).
    """

    def __init__(self):
        self.buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def stage(self, shard: Any) -> Any:
        """A deep copy of ``shard`` whose tensors are these buffers, filled; returns once the copies are complete."""
        used: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        devices: set[torch.device] = set()

        def copy(t: torch.Tensor, where: str) -> torch.Tensor:
            key = (where, tuple(t.shape), t.dtype)
            buffer = self.buffers.get(key)
            if buffer is None:
                buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            used[key] = buffer
            if t.is_cuda:
                devices.add(t.device)
            buffer.copy_(t.detach(), non_blocking=t.is_cuda)
            return buffer

        staged = _stage(shard, copy)
        for device in devices:
            torch.cuda.synchronize(device)
        self.buffers = used
        return staged


def _stage(obj: Any, copy, where: str = "shard") -> Any:
    """Deep copy for the writer thread: tensors become ``copy(tensor, where)``, detached contiguous CPU tensors (a
    view no longer drags its whole storage into the file, and training may go on updating the originals)."""
    if isinstance(obj, torch.Tensor):
        return copy(obj, where)
    if isinstance(obj, dict):
        return {k: _stage(v, copy, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stage(v, copy, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_stage(v, copy, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, _LEAVES):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be checkpointed (torch.load(weights_only=True) would "
                    "refuse it); store tensors, dicts, lists, tuples, str, int, float, bool, bytes, None, "
                    "torch.dtype or torch.device")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class _HashingWriter:
    """The file object torch.save writes into: hashes on the way (no second read of the file) and hosts the
    ``mid_shard`` crash point once half of the tensor bytes are out."""

    def __init__(self, f, rank: int, half: int):
        self.f, self.rank, self.half = f, rank, half
        self.sha256, self.size = hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError about positions

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(data)
        before, self.size = self.size, self.size + n
        if before <= self.half <= self.size:
            self.f.flush()
            _crash_point("mid_shard", self.rank)
        return n

    def flush(self) -> None:
        self.f.flush()


def _write_shard(path: Path, shard: dict[str, Any], rank: int) -> tuple[int, str]:
    """torch.save ``shard`` to ``path`` and fsync it; returns (size, sha256) of the bytes written."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f, rank, _tensor_bytes(shard) // 2)
        try:
            torch.save(shard, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return writer.size, writer.sha256.hexdigest()


@dataclass
class StoredCheckpoint:
    """A published checkpoint whose files matched its manifest when load() returned it."""

    step: int
    path: Path
    meta: dict[str, Any]
    world_size: int  # number of rank files it was saved with (may differ from the current world size)
    skipped: list[str]  # why newer checkpoints were not used

    def read(self, rank: int, mmap: bool = False) -> dict[str, Any]:
        """The dict that ``rank`` gave save(), on the CPU. ``mmap``: tensors map the file instead of being read,
        so a rank that needs a few slices of another rank's file reads only those pages."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{self.path}: saved with {self.world_size} ranks, has no rank {rank}")
        return torch.load(self.path / _rank_file(rank), map_location="cpu", weights_only=True, mmap=mmap)


class CheckpointStore:
    """This rank's view of a checkpoint directory (see the module docstring for the layout and protocol).

    Every rank constructs one before any rank saves (any collective in between, such as the first training
    step, guarantees it): rank 0's constructor deletes the ``.tmp_step_*`` directories of crashed saves, whose
    leftover ``.done`` records would otherwise let a re-save of the same step publish another run's shards.
    """

    def __init__(self, root: str | Path, rank: int, world_size: int, *, keep_last: int = 2, keep_every: int = 0,
                 publish_timeout_s: float = 600.0, on_save_error: str = "stop"):
        if not 0 <= rank < world_size:
            raise ValueError(f"checkpoint store: rank {rank} is outside world_size {world_size}")
        if keep_last < 1:
            raise ValueError(f"checkpoint store: keep_last must be >= 1 (got {keep_last}); the newest checkpoint is "
                             "what a restart resumes from")
        if keep_every < 0:
            raise ValueError(f"checkpoint store: keep_every must be >= 0 (0 = off), got {keep_every}")
        if publish_timeout_s <= 0:
            raise ValueError(f"checkpoint store: publish_timeout_s must be > 0, got {publish_timeout_s}")
        if on_save_error not in ("stop", "continue"):
            raise ValueError(f"checkpoint store: on_save_error must be stop or continue, got {on_save_error!r}")
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every, self.publish_timeout_s = keep_last, keep_every, publish_timeout_s
        self.on_save_error = on_save_error
        self.root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            unfinished = sorted(name for name in os.listdir(self.root) if _TMP_DIR.match(name))
            for name in unfinished:
                shutil.rmtree(self.root / name, ignore_errors=True)
            if unfinished:
                warnings.warn(f"{self.root}: removed {', '.join(unfinished)}: a save (or a deletion) that was "
                              "interrupted before it finished; it was never a published checkpoint", stacklevel=2)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"ckpt-writer-rank{rank}")
        self._pending: concurrent.futures.Future | None = None
        self._error: CheckpointWriteError | None = None  # set by the writer thread, raised by check()
        self._ranks_reported = False  # rank 0's writer: every rank of the save in flight is done or failed
        self.staging = StagingBuffers()
        self.write_seconds: list[float] = []  # per save: this rank's background write (and rank 0's publish)
        self.failed_saves = 0  # background writes that failed (with on_save_error='continue', training went on)

    # -- saving ------------------------------------------------------------------------------------------------

    def save(self, step: int, shard: dict[str, Any], meta: dict[str, Any]) -> float:
        """Stage ``shard`` (deep copy: every tensor copied to a reused CPU buffer, contiguous, detached)
        synchronously, then write it in a background thread and return at once. Returns the seconds this call
        blocked (waiting for the previous save + staging). Every rank calls save for the same step; ``meta``
        (JSON-able) is written by rank 0 only; ``"finite": False`` in it marks a checkpoint load() will skip.
        Raises CheckpointWriteError for an earlier failed write (see check())."""
        if self._executor is None:
            raise RuntimeError(f"{self.root}: save() after close()")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"{self.root}: step must be a non-negative int, got {step!r}")
        start = time.perf_counter()
        self.wait()
        staged = self.staging.stage(shard)
        meta_json = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode() if self.rank == 0 else b""
        self._pending = self._executor.submit(self._write, step, staged, meta_json)
        return time.perf_counter() - start

    def wait(self) -> None:
        """Block until this rank's pending write (and, on rank 0, the publish) has finished, then check()."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        self.check()

    def check(self) -> None:
        """Raise CheckpointWriteError, once, if a background write failed since the last check; with
        on_save_error='continue' the failure was only printed. Reads a flag: no device sync, no filesystem access;
        the loop calls it once per step so that a failed save stops training at the next step."""
        error, self._error = self._error, None
        if error is not None and self.on_save_error == "stop":
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _write(self, step: int, shard: dict[str, Any], meta_json: bytes) -> None:
        """The writer thread's job; a failure is reported at once and flagged for check(), never raised here."""
        started = time.perf_counter()
        tmp = self.root / f".tmp_{_step_dir_name(step)}"
        path, publishing = tmp / _rank_file(self.rank), False
        self._ranks_reported = False
        try:
            tmp.mkdir(exist_ok=True)
            _crash_point("before_shard", self.rank)
            size, sha256 = _write_shard(path, shard, self.rank)
            _crash_point("after_shard", self.rank)
            done = json.dumps({"bytes": size, "sha256": sha256}).encode()
            _replace_durable(tmp / _done_file(self.rank), done)
            if self.rank == 0:
                path, publishing = tmp, True
                self._publish(step, tmp, meta_json)
        except Exception as e:  # OSError (a full disk), CheckpointError (another rank failed): all stop the save
            self._fail(step, getattr(e, "filename", None) or path, tmp, e, publishing)
            return
        self.write_seconds.append(time.perf_counter() - started)

    def _fail(self, step: int, path: str | Path, tmp: Path, error: Exception, publishing: bool) -> None:
        """Report a failed write at once, free its space, tell rank 0 (a ``.failed`` record) and flag it for check()."""
        self.failed_saves += 1
        self._error = CheckpointWriteError(f"checkpoint of step {step} not saved: writing {path} failed: "
                                           f"{type(error).__name__}: {error}")
        then = ("training stops at the next step (checkpoint.on_save_error=continue would train on)"
                if self.on_save_error == "stop" else "training goes on (checkpoint.on_save_error=continue)")
        print(f"error: rank {self.rank}: {self._error}; {then}", file=sys.stderr, flush=True)
        if publishing:
            if self._ranks_reported:  # no rank writes here any more (after a timeout, a stalled one might)
                shutil.rmtree(tmp, ignore_errors=True)
            return
        (tmp / _rank_file(self.rank)).unlink(missing_ok=True)
        try:
            _replace_durable(tmp / _failed_file(self.rank), str(self._error).encode())
        except OSError:
            pass  # rank 0 then waits for publish_timeout_s and names this rank

    def _publish(self, step: int, tmp: Path, meta_json: bytes) -> None:
        """Rank 0, after its own shard: wait for every rank's record, then manifest, rename, latest, retention."""
        files = self._await_ranks(step, tmp)
        _write_durable(tmp / "meta.json", meta_json)
        files["meta.json"] = {"bytes": len(meta_json), "sha256": hashlib.sha256(meta_json).hexdigest()}
        for r in range(self.world_size):
            (tmp / _done_file(r)).unlink()
        _crash_point("before_manifest", self.rank)
        manifest = {"version": VERSION, "step": step, "world_size": self.world_size,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        _write_durable(tmp / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        _crash_point("before_rename", self.rank)
        final = self.root / _step_dir_name(step)
        if final.exists():  # re-saving a step after resuming from an older checkpoint: the new one wins
            old = self.root / f".tmp_{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        _crash_point("before_latest", self.rank)
        _replace_durable(self.root / "latest", (final.name + "\n").encode())
        self._apply_retention(step)

    def _await_ranks(self, step: int, tmp: Path) -> dict[str, dict[str, Any]]:
        """Poll ``tmp`` until every rank's ``.done`` (or ``.failed``) record is there; returns the manifest entries of
        the rank files, or raises CheckpointError naming the ranks that failed."""
        deadline = time.monotonic() + self.publish_timeout_s
        wanted = {_done_file(r): r for r in range(self.world_size)}
        failed = {_failed_file(r): r for r in range(self.world_size)}
        delay = 0.005
        while True:
            listed = set(os.listdir(tmp))  # listdir, not exists(): NFS caches lookups
            missing = sorted(name for name, r in wanted.items() if name not in listed and _failed_file(r) not in listed)
            if not missing:
                self._ranks_reported = True
                break
            if time.monotonic() > deadline:
                ranks = [wanted[name] for name in missing]
                raise CheckpointError(
                    f"{tmp}: step {step} not published: after {self.publish_timeout_s:g} s, ranks {ranks} have not "
                    f"finished writing their shards (no {missing[0]}); one probably crashed or stalled "
                    "(publish_timeout_s sets the limit)")
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        if failures := [(r, (tmp / name).read_text(errors="replace")) for name, r in failed.items() if name in listed]:
            raise CheckpointError(f"{tmp}: step {step} not published: " + "; ".join(f"rank {r}: {why}" for r, why in failures))
        files = {}
        for r in range(self.world_size):
            record = json.loads((tmp / _done_file(r)).read_text())
            size = (tmp / _rank_file(r)).stat().st_size
            if size != record["bytes"]:
                raise CheckpointError(f"{tmp / _rank_file(r)}: {size} bytes, but rank {r} reported {record['bytes']}")
            files[_rank_file(r)] = record
        return files

    def _apply_retention(self, published: int) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``published`` and every multiple of ``keep_every``; drop
        crashed saves older than ``published``. Newer steps (left by a run that went back to an older checkpoint)
        are not ours to judge and stay."""
        for name in os.listdir(self.root):
            if (m := _TMP_DIR.match(name)) and int(m.group(1)) < published:
                shutil.rmtree(self.root / name, ignore_errors=True)
        steps = [s for s in self.complete_steps() if s <= published]
        finite = [s for s in steps if self._finite(s)]
        keep = set(finite[-self.keep_last:]) | {published}
        if self.keep_every:
            keep |= {s for s in finite if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:  # rename first: a crash mid-delete leaves a .tmp_ directory, not a broken step_
                trash = self.root / f".tmp_{_step_dir_name(s)}"
                os.replace(self.root / _step_dir_name(s), trash)
                shutil.rmtree(trash)

    # -- loading -----------------------------------------------------------------------------------------------

    def _finite(self, step: int) -> bool:
        """False only if the checkpoint's meta says ``"finite": false`` (an unreadable meta is load()'s to judge)."""
        try:
            return json.loads((self.root / _step_dir_name(step) / "meta.json").read_text()).get("finite", True) is not False
        except (OSError, ValueError, AttributeError):
            return True

    def complete_steps(self) -> list[int]:
        """Steps of the published checkpoints, ascending (not verified: load() does that)."""
        return sorted(int(m.group(1)) for name in os.listdir(self.root)
                      if (m := _STEP_DIR.fullmatch(name)) and (self.root / name).is_dir())

    def load(self, step: int | None = None) -> StoredCheckpoint:
        """The checkpoint of ``step``, or with None the newest one that matches its manifest (sizes and sha256 of
        every file) and whose meta does not say ``"finite": false``, warning about newer ones it skipped.
        ``latest`` is not consulted: after a crash between the rename and its update it is stale, while the
        directory listing never is."""
        if step is not None:
            if not (self.root / _step_dir_name(step)).is_dir():
                raise FileNotFoundError(f"{self.root}: no published checkpoint for step {step} "
                                        f"(published: {self.complete_steps() or 'none'})")
            checkpoint = self._verified(step, [])
            if checkpoint.meta.get("finite", True) is False:
                raise CheckpointError(f"{checkpoint.path}: saved with non-finite values (meta.json: finite false)")
            return checkpoint
        skipped: list[str] = []
        for s in reversed(self.complete_steps()):
            try:
                checkpoint = self._verified(s, list(skipped))
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            if checkpoint.meta.get("finite", True) is False:
                skipped.append(f"{checkpoint.path.name}: saved with non-finite values (meta.json: finite false)")
                continue
            if skipped:
                warnings.warn(f"{self.root}: loading {_step_dir_name(s)}, skipped newer checkpoints: "
                              + "; ".join(skipped), stacklevel=2)
            return checkpoint
        raise FileNotFoundError(f"{self.root}: no usable checkpoint"
                                + (f" (skipped: {'; '.join(skipped)})" if skipped else " (no step_* directory)"))

    def _verified(self, step: int, skipped: list[str]) -> StoredCheckpoint:
        path = self.root / _step_dir_name(step)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            version, saved_step, world_size = manifest["version"], manifest["step"], int(manifest["world_size"])
            files = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path.name}: unreadable manifest.json ({type(e).__name__}: {e})") from None
        if version != VERSION or saved_step != step:
            raise CheckpointError(f"{path.name}: manifest.json says version {version}, step {saved_step}; "
                                  f"expected version {VERSION}, step {step}")
        if missing := ({_rank_file(r) for r in range(world_size)} | {"meta.json"}) - files.keys():
            raise CheckpointError(f"{path.name}: manifest.json does not list {sorted(missing)}")
        for name, (size, sha256) in sorted(files.items()):
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path.name}: {name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(f"{path.name}: {name} has {file.stat().st_size} bytes, the manifest says {size}")
            if _sha256_file(file) != sha256:
                raise CheckpointError(f"{path.name}: {name} does not match its sha256 in the manifest")
        return StoredCheckpoint(step, path, json.loads((path / "meta.json").read_text()), world_size, skipped)
