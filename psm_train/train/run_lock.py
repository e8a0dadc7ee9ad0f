"""One trainer per run directory: an exclusive ``flock`` on ``run_dir/.lock``.

Two trainers on one run directory (a restart racing the ranks of a killed launcher, a second
submission) would delete each other's checkpoints and interleave metrics. The lock is held by an
open file, so the kernel releases it when the holder dies, however it dies: no stale locks. The
file keeps the holder's pid, host, start time and command, for the error the next trainer gets.
flock works on local filesystems and on NFS (Linux emulates it with byte-range locks there).

In a multi-rank run only rank 0 takes the lock: the other ranks belong to the same run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from psm_train.errors import RunStopped

LOCK_FILE = ".lock"


class RunDirLocked(RunStopped):
    """Another live process trains in this run directory; the message names it."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it left no holder record)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command')}"


def read_holder(run_dir: str | Path) -> dict:
    """The holder record of the lock file ({} if there is none or it is unreadable); says nothing about liveness."""
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def lock_holder(run_dir: str | Path) -> dict | None:
    """The record of the process holding the run directory's lock now, or None when nobody holds it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(run_dir)
    finally:
        os.close(fd)  # releases the shared lock taken to test
    return None


class RunLock:
    """``with RunLock(run_dir):`` train; RunDirLocked at entry if another live process holds the directory.

    Only rank 0 of a multi-rank run takes it (the other ranks are the same run).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays readable
        for attempt in range(20):  # a `psm-train jobs` probe holds a shared lock for a moment
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise RunDirLocked(f"{self.path.parent} is in use by {_describe(read_holder(self.path.parent))}; "
                               "stop that trainer (or wait for it) before training here again") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the record stays for people and `psm-train jobs`
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
