"""Run a function on N local ranks with the gloo backend (the CPU stand-in for NCCL in tests)."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # As psm_train.cli does for torchrun ranks: no interpreter finalization, where gloo's and autograd's
    # threads can abort a finished process (pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args) -> None:
    """Call fn(rank, world_size, *args) in world_size processes; re-raise the first rank's failure here."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, errors), nprocs=world_size, start_method="spawn")
    except mp.ProcessRaisedException:
        raise AssertionError(errors.get() if not errors.empty() else "a rank failed") from None
