"""Bring up torch.distributed from the launcher's environment: torchrun, SLURM, or nothing.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` every
task gets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead; the master is the first host of
SLURM_JOB_NODELIST. Without either, the run is a single process and no process group is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST: cannot read a host from {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int_env(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r}: expected an integer") from None


def read_env(env: dict[str, str] | None = None) -> DistEnv:
    """The process's place in the job, from torchrun's variables, else SLURM's, else a single process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        return DistEnv(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # A port derived from the job id lets two jobs share a node without colliding.
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job_id % 20000,
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "single")


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistEnv:
    """Create the default process group (nccl on GPU, gloo on CPU) unless the run is a single process.

    Also exports the torchrun variables, which DeepSpeed reads, when the launcher was SLURM.
    """
    denv = read_env()
    if not denv.is_distributed or dist.is_initialized():
        return denv
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(denv.local_rank)
    dist.init_process_group(backend, rank=denv.rank, world_size=denv.world_size, timeout=timedelta(seconds=timeout_s))
    return denv


def init_single_rank_group(device_type: str) -> None:
    """A process group of this process alone (nccl on GPU, gloo on CPU), unless one exists.

    DeepSpeed needs a process group even at world size 1 (single process or ``--nproc 1``). Its
    store lives in this process, so no address or port is taken. The caller destroys the group.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = read_env().local_rank
    for key, value in (("RANK", 0), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 1)):
        os.environ.setdefault(key, str(value))  # DeepSpeed reads them besides the group (true of this process)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
