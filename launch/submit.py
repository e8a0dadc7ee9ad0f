"""Executors and sbatch parameters: from ``psm-train submit`` flags to a submitit job.

One task per GPU (or per CPU process on CPU-only clusters); each task runs the trainer through
``srun``. SLURM's refusals are shown verbatim, with a hint about what to check.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from psm_train.launch import registry

EXECUTORS = ("slurm", "local")


class SubmissionError(RuntimeError):
    """A job that could not be submitted; the message is meant for the user as is."""


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # CPU processes per node when gpus_per_node is 0
    cpus_per_task: int | None = None
    time: str = "60"  # SLURM syntax: minutes, [D-]HH:MM:SS, ...
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None  # per node, SLURM syntax (e.g. 64G); None: the cluster's default
    exclusive: bool = False
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time to save a checkpoint
    array_parallelism: int = 4  # sweeps: members running at once

    def validate(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise SubmissionError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (1, self.gpus_per_node):
            raise SubmissionError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                                  "a GPU job runs one task per GPU; leave --tasks-per-node out")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SubmissionError("--cpus-per-task must be >= 1")
        if self.array_parallelism < 1:
            raise SubmissionError("array parallelism must be >= 1")
        time_minutes(self.time)

    @property
    def tasks(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node)


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def time_minutes(text: str) -> int:
    """SLURM's --time formats to whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise SubmissionError(f"--time {text!r}: expected minutes or [D-]HH:MM:SS (SLURM's syntax), e.g. 90 or 1:30:00")
    d, a, b, c = (int(g) if g is not None else None for g in m.group("d", "a", "b", "c"))
    if d is None:
        seconds = a * 60 + (b or 0) if c is None else a * 3600 + b * 60 + c
    else:  # D-H, D-H:M, D-H:M:S
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    return max(1, -(-seconds // 60))


def slurm_parameters(res: Resources, job_name: str) -> dict[str, Any]:
    """Keyword arguments for submitit's SlurmExecutor.update_parameters (sbatch flags)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.gpus_per_node or res.tasks_per_node,
        "time": time_minutes(res.time),
        "signal_delay_s": res.signal_delay_s,
        "array_parallelism": res.array_parallelism,
        # the job requeues itself after preemption; some clusters default to non-requeueable jobs
        "additional_parameters": {"requeue": True},
        # one crashed rank ends the step instead of leaving the others blocked in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {"gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task,
                "partition": res.partition, "account": res.account, "qos": res.qos,
                "constraint": res.constraint, "mem": res.mem, "exclusive": res.exclusive or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def sbatch_script(res: Resources, job_name: str, folder: Path, array_size: int | None = None) -> str:
    """The sbatch script submitit would write for this job (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the exact text submitit submits

    params = slurm_parameters(res, job_name)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


def make_executor(kind: str, folder: Path, res: Resources, job_name: str):
    import submitit

    res.validate()
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise SubmissionError("no SLURM here (sbatch not found): use --executor local, "
                                  "or start a local cluster with `bash tools/slurm_local.sh start`")
        # max_num_timeout only matters to submitit's own signal handler, which the job replaces
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        ex.update_parameters(**slurm_parameters(res, job_name))
        return ex
    if kind == "local":
        if res.nodes != 1 or res.gpus_per_node:
            raise SubmissionError("--executor local runs one node of CPU processes: use --nodes 1 and no GPUs")
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=res.tasks_per_node, timeout_min=time_minutes(res.time),
                             signal_delay_s=res.signal_delay_s)
        return ex
    raise SubmissionError(f"--executor {kind!r}: expected one of {', '.join(EXECUTORS)}")


def free_port() -> int:
    """A TCP port free right now, for the local executor's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_paths(folder: Path, job_id: str, tasks: int) -> list[tuple[Path, Path]]:
    """(stdout, stderr) of every task of a submitit job."""
    from submitit.core.utils import JobPaths

    return [(p.stdout, p.stderr) for p in (JobPaths(folder, job_id=job_id, task_id=t) for t in range(tasks))]


def submitted(run_dir: Path, job, kind: str, folder: Path, res: Resources) -> None:
    registry.append(run_dir, "submitted", job_id=job.job_id, executor=kind, log_folder=str(folder),
                    tasks=res.tasks, nodes=res.nodes)


def refusal(error: Exception) -> SubmissionError:
    """sbatch's own message, verbatim, with a hint about what to check."""
    text = str(error).strip()
    hints = [
        ("partition", "`sinfo -s` lists the partitions; --partition picks one"),
        ("time limit", "`sinfo -o '%P %l'` shows each partition's time limit; --time takes minutes or [D-]HH:MM:SS"),
        ("account", "`sacctmgr show assoc user=$USER format=account,partition,qos` lists your accounts"),
        ("qos", "`sacctmgr show assoc user=$USER format=account,qos` lists the QOS you may use"),
        ("feature", "`sinfo -o '%P %f'` lists the node features that --constraint can ask for"),
        ("memory", "`sinfo -o '%P %m'` shows memory per node (MB); --mem is per node, e.g. 64G"),
        ("node configuration", "no node has that many CPUs/GPUs/memory: `sinfo -o '%P %c %G %m'`"),
    ]
    hint = next((h for key, h in hints if key in text.lower()),
                "`psm-train submit ... --dry-run` prints the sbatch parameters that were sent")
    return SubmissionError(f"SLURM refused the job:\n{text}\nhint: {hint}")


def submit_one(fn: Callable[[], Any], run_dir: Path, kind: str, res: Resources, job_name: str):
    """Submit ``fn`` as one job whose logs go to run_dir/logs; record it in run_dir/jobs.jsonl."""
    import submitit

    folder = run_dir / "logs"
    ex = make_executor(kind, folder, res, job_name)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; refusal() shows it once
            job = ex.submit(fn)
    except submitit.core.utils.FailedJobError as e:
        raise refusal(e) from None
    submitted(run_dir, job, kind, folder, res)
    return job


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def submit_array(fns: Sequence[Callable[[], Any]], run_dirs: Sequence[Path], folder: Path, kind: str,
                 res: Resources, job_name: str) -> list:
    """Submit ``fns`` as one job array (SLURM, at most res.array_parallelism at once)."""
    import submitit

    ex = make_executor(kind, folder, res, job_name)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            jobs = ex.map_array(_call, list(fns))
    except submitit.core.utils.FailedJobError as e:
        raise refusal(e) from None
    for job, run_dir in zip(jobs, run_dirs):
        submitted(run_dir, job, kind, folder, res)
    return jobs
