"""What every task of a submitted job runs: the trainer, wrapped in requeue-on-preemption and
bounded retries on failure.

On SIGUSR2 (preemption or the time limit is near) the trainer saves a checkpoint with all ranks
and returns ``{"preempted": True, ...}``; rank 0 then requeues the job (``scontrol requeue``), and
the requeued job runs this again: the trainer resumes from the run directory's newest checkpoint
and wandb continues the run whose id is stored there. Each requeue is recorded in
``run_dir/jobs.jsonl``; ``max_requeues`` and ``retries`` bound the loops.

Leaving by ``SystemExit`` is deliberate: submitit then writes no result file, so the job counts as
unfinished until the requeued run completes.

A task whose outcome is settled (submitit stored its success, or it requeued or stopped on purpose)
leaves without interpreter finalization: torch's gloo and autograd threads can race the GIL teardown and
abort the process ("terminate called without an active exception", pytorch#190489), and srun then ends
the whole job as failed, its other tasks killed, perhaps before rank 0 has requeued it.
"""

from __future__ import annotations

import atexit
import copy
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from psm_train.launch import registry
from psm_train.train import preemption


@dataclass
class TrainJob:
    """Picklable job function: ``config`` is a resolved ``RunConfig.to_dict()`` with an absolute run_dir."""

    config: dict[str, Any]
    retries: int = 1  # requeues after a failure (an exception in any rank)
    max_requeues: int = 20  # requeues after preemption or a near time limit
    master_port: int = 0  # the local executor's rendezvous port (SLURM jobs: the trainer's choice)

    def __call__(self) -> Any:
        return run_task(self.train, Path(self.config["run_dir"]), self.retries, self.max_requeues, self.master_port)

    def train(self) -> Any:
        # imported here, after run_task has replaced submitit's signal handlers: importing torch takes seconds
        from psm_train.config import config_from_dict
        from psm_train.train.loop import train

        return train(config_from_dict(copy.deepcopy(self.config), "submitted config"))


def run_task(fn: Callable[[], Any], run_dir: Path, retries: int, max_requeues: int, master_port: int = 0) -> Any:
    """Run ``fn`` in one task of a submitit job with the requeue policy described above."""
    import submitit

    env = submitit.JobEnvironment()
    leave = _SettledExit(env.paths.result_pickle)
    # Registered before torch and wandb register theirs, so it runs after them (atexit is last in, first out).
    atexit.register(leave)
    preemption.install()
    if env.cluster == "local":
        _export_torchrun_env(env, master_port)
    job_id, rank = env.job_id, env.global_rank
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    requeueable = env.cluster == "slurm"
    if rank == 0:
        registry.append(run_dir, "started", job_id=job_id, restart=restart, host=env.hostname, tasks=env.num_tasks)
    try:
        result = fn()
    except (Exception, SystemExit) as e:
        error = f"{type(e).__name__}: {e}"
        used = registry.requeues(run_dir, job_id, "failed")
        # The trainer raises SystemExit for a user error (a bad device, a finished run): no retry.
        if requeueable and used < retries and not isinstance(e, SystemExit):
            registry.append(run_dir, "requeued", job_id=job_id, restart=restart, kind="failed", rank=rank,
                            reason=f"retry {used + 1}/{retries} after {error}")
            refused = _requeue(job_id)
            if refused:  # perhaps another failing rank requeued it first; the job ends either way
                print(refused, file=sys.stderr, flush=True)
                raise
            raise leave.with_status(1) from e
        why = "not retried: a usage error" if isinstance(e, SystemExit) else f"retries used: {used}/{retries}"
        registry.append(run_dir, "failed", job_id=job_id, restart=restart, rank=rank, reason=f"{error} ({why})")
        if isinstance(e, SystemExit):  # as an exception, submitit records it as the job's error
            raise RuntimeError(str(e)) from e
        raise

    if not (isinstance(result, dict) and result.get("preempted")):
        if rank == 0:
            registry.append(run_dir, "finished", job_id=job_id, restart=restart)
        return result

    sig = preemption.stop_signal()
    where = f"{sig.name if sig else 'a signal'} at step {result.get('step', '?')}"
    if sig is not signal.SIGUSR2 or not requeueable:
        # SIGTERM: SLURM is ending the job (scancel, or a preemption it requeues itself).
        if rank == 0:
            registry.append(run_dir, "stopped", job_id=job_id, restart=restart, reason=f"checkpointed after {where}")
        raise leave.with_status(143 if sig is signal.SIGTERM else 1)
    if rank == 0:
        used = registry.requeues(run_dir, job_id, "preempted")
        if used >= max_requeues:
            registry.append(run_dir, "failed", job_id=job_id, restart=restart, rank=rank,
                            reason=f"preempted {used + 1} times; not requeued (max_requeues={max_requeues})")
            raise RuntimeError(f"{where}: not requeued, job already requeued {used} times (max_requeues={max_requeues})")
        refused = _requeue(job_id)
        if refused:
            registry.append(run_dir, "failed", job_id=job_id, restart=restart, rank=rank,
                            reason=f"checkpointed after {where}, but {refused}")
            raise RuntimeError(refused)
        registry.append(run_dir, "requeued", job_id=job_id, restart=restart, kind="preempted", rank=rank,
                        reason=f"checkpointed after {where}; requeue {used + 1}/{max_requeues}")
    raise leave.with_status(0)


class _SettledExit:
    """atexit hook: the process's exit without finalization, once its status is settled."""

    def __init__(self, result_pickle: Path):
        self.result_pickle = result_pickle
        self.status: int | None = None

    def with_status(self, status: int) -> SystemExit:
        self.status = status
        return SystemExit(status)

    def __call__(self) -> None:
        status = self.status if self.status is not None else self._stored_success()
        if status is None:  # an exception: its exit status stands, whatever finalization does
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def _stored_success(self) -> int | None:
        from submitit.core.utils import pickle_load

        try:
            return 0 if pickle_load(self.result_pickle)[0] == "success" else None
        except (OSError, EOFError):
            return None


def _requeue(job_id: str) -> str | None:
    """Put this job back in the queue (SLURM then ends its running tasks and starts it again);
    the reason when SLURM refuses."""
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return f"scontrol requeue {job_id} failed: {out.stderr.strip()}" if out.returncode else None


def _export_torchrun_env(env, master_port: int) -> None:
    """The local executor sets only SUBMITIT_LOCAL_* variables; the trainer reads torchrun's."""
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
    )
