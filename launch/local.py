"""``psm-train sweep SWEEP.yaml --executor local``: a sweep's members as concurrent ``psm-train train``
processes on this machine.

Packing: with GPUs visible (CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``) each GPU takes ``per_gpu``
members at once, each member seeing only its GPU; a member with ``gpus_per_member`` > 1 takes that
many whole GPUs and runs one rank per GPU through torchrun. Without GPUs, ``max_parallel`` members
(default 1) run on the CPU, the cores shared out through OMP_NUM_THREADS unless it is set.
``max_parallel`` also caps the GPU case. Members start in the sweep file's order; a decay branch
starts once its stable run has published the checkpoint it continues (launch/branch.py), which
may be while the stable run is still training.

A wall-clock ``budget_s`` ends the invocation: running members get SIGTERM, save a checkpoint at
their next logged step and exit 143 ("stopped"), members not yet started stay "pending". Ctrl-C or
a SIGTERM to the controller does the same; members get SIGTERM too if the controller dies. Running the same command again skips finished members (final.pt) and continues the
others: the trainer resumes from its run directory on its own. A member still running ``grace_s``
after its SIGTERM is killed ("failed"; it resumes from its last saved checkpoint next time).

Each member's stdout and stderr go to ``<run dir>/logs/<pid>_0_log.{out,err}`` and its events to
``<run dir>/jobs.jsonl`` (job id: the pid), so ``psm-train jobs`` reports local members like
submitted ones. A table of member states (pending, waiting, running, stopped, done, failed) with
step and loss is redrawn on stderr every ``refresh_s`` seconds (on a terminal; otherwise state
changes are printed as lines).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from psm_train.launch import registry
from psm_train.launch.branch import start_branch
from psm_train.launch.jobs import last_metrics
from psm_train.launch.submit import SubmissionError, log_paths
from psm_train.launch.sweep import LocalOptions, Member, Sweep

STOPPED_CODES = (143, -signal.SIGTERM)  # the trainer's exit after a SIGTERM checkpoint; killed before its handler


@dataclass
class LocalRun:
    member: Member
    state: str = "pending"  # pending | waiting | running | stopped | done | failed
    proc: subprocess.Popen | None = None
    gpus: tuple[str, ...] = ()
    started: float | None = None  # time.time() of the start and of the exit
    ended: float | None = None
    signalled: float | None = None  # time.monotonic() of the SIGTERM
    returncode: int | None = None
    note: str = ""


def visible_gpus() -> list[str]:
    """GPU ids a member may be given in CUDA_VISIBLE_DEVICES: this process's own list, else every GPU here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and not g.strip().startswith("-")]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.stdout.splitlines() if l.startswith("GPU "))] \
        if out.returncode == 0 else []


class Packer:
    """Which GPUs the next member gets, if any slot is free: spread over the emptiest GPU first."""

    def __init__(self, gpus: list[str], opts: LocalOptions):
        self.per_gpu, self.width = opts.per_gpu, opts.gpus_per_member
        if gpus and self.width > len(gpus):
            raise SubmissionError(f"local: gpus_per_member {self.width}, but {len(gpus)} GPU(s) visible")
        if not gpus and self.width > 1:
            raise SubmissionError(f"local: gpus_per_member {self.width}, but no GPU is visible "
                                  "(CUDA_VISIBLE_DEVICES / nvidia-smi)")
        self.free = {g: self.per_gpu for g in gpus}
        if gpus:
            slots = len(gpus) * self.per_gpu // self.width
            self.limit = min(opts.max_parallel, slots) if opts.max_parallel else slots
        else:
            self.limit = opts.max_parallel or 1
        self.running = 0

    def take(self) -> tuple[str, ...] | None:
        if self.running >= self.limit:
            return None
        if not self.free:
            taken: tuple[str, ...] = ()
        elif self.width == 1:
            gpu = max(self.free, key=lambda g: self.free[g])
            if not self.free[gpu]:
                return None
            taken = (gpu,)
        else:
            whole = [g for g, n in self.free.items() if n == self.per_gpu]
            if len(whole) < self.width:
                return None
            taken = tuple(whole[: self.width])
        for g in taken:
            self.free[g] -= 1 if self.width == 1 else self.per_gpu
        self.running += 1
        return taken

    def give(self, gpus: tuple[str, ...]) -> None:
        for g in gpus:
            self.free[g] += 1 if self.width == 1 else self.per_gpu
        self.running -= 1

    def where(self) -> str:
        if not self.free:
            return f"CPU, {self.limit} member(s) at once"
        what = f"{self.per_gpu} member(s) per GPU" if self.width == 1 else f"{self.width} GPUs per member"
        return f"GPUs {','.join(self.free)}, {what}, at most {self.limit} at once"


def _stop_with_controller() -> None:
    """In the member before exec (Linux): SIGTERM when the controller dies, however it dies, so that no member
    outlives it unwatched; the member then checkpoints and exits as after a budget stop."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start(run: LocalRun, gpus: tuple[str, ...], cpu_threads: int | None) -> None:
    cfg = run.member.cfg
    run_dir = Path(cfg.run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = run_dir / "member.yaml"  # the resolved config: what runs does not depend on the sweep file later
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "psm_train", "train", str(config)]
    if len(gpus) > 1:
        cmd += ["--nproc", str(len(gpus))]
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif cpu_threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    out_tmp, err_tmp = logs / ".starting.out", logs / ".starting.err"
    with out_tmp.open("ab") as out, err_tmp.open("ab") as err:
        # its own session: a Ctrl-C in this terminal reaches the controller, which passes on a SIGTERM
        run.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True,
                                    preexec_fn=_stop_with_controller)
    job_id = str(run.proc.pid)
    out_path, err_path = log_paths(logs, job_id, 1)[0]
    os.replace(out_tmp, out_path)  # the child keeps writing to the renamed files
    os.replace(err_tmp, err_path)
    registry.append(run_dir, "submitted", job_id=job_id, executor="local", log_folder=str(logs),
                    tasks=max(1, len(gpus)), nodes=1)
    registry.append(run_dir, "started", job_id=job_id, restart=0, host=socket.gethostname(), tasks=max(1, len(gpus)))
    run.state, run.gpus, run.started = "running", gpus, time.time()


def _finish(run: LocalRun, killed_after: float) -> None:
    run_dir = Path(run.member.cfg.run_dir)
    code = run.returncode = run.proc.returncode
    run.ended = time.time()
    job_id = str(run.proc.pid)
    if code == 0 and (run_dir / "final.pt").is_file():
        run.state = "done"
        registry.append(run_dir, "finished", job_id=job_id, restart=0)
        return
    # Once signalled, torchrun (a multi-GPU member) exits with its own code after its ranks have checkpointed.
    if not killed_after and (code in STOPPED_CODES or (run.signalled is not None and code != 0)):
        run.state = "stopped"
        registry.append(run_dir, "stopped", job_id=job_id, restart=0, reason=f"SIGTERM (exit {code}): checkpointed")
        return
    run.state = "failed"
    run.note = (f"killed: still running {killed_after:.0f} s after SIGTERM" if killed_after
                else f"exit {code}" + (" without final.pt" if code == 0 else ""))
    registry.append(run_dir, "failed", job_id=job_id, restart=0, rank=0, reason=run.note)


def _table(runs: list[LocalRun], started: float) -> list[str]:
    rows = [("MEMBER", "STATE", "STEP", "LOSS", "DEVICE", "TIME")]
    for r in runs:
        step, loss = last_metrics(Path(r.member.cfg.run_dir)) if r.state != "pending" else (None, None)
        since = r.started if r.started is not None else None
        elapsed = "" if since is None else f"{(r.ended or time.time()) - since:.0f}s"
        device = ("gpu " + ",".join(r.gpus)) if r.gpus else ("cpu" if r.started else "")
        rows.append((r.member.slug, r.state + (f" ({r.note})" if r.note and r.state == "failed" else ""),
                     "-" if step is None else f"{step}/{r.member.cfg.train.steps}",
                     "-" if loss is None else f"{loss:.4f}", device, elapsed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    counts = {s: sum(r.state == s for r in runs) for s in ("pending", "waiting", "running", "stopped", "done", "failed")}
    head = f"local sweep, {time.time() - started:.0f}s: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


class _Display:
    """The live table on a terminal (redrawn in place); state changes as lines otherwise."""

    def __init__(self, stream: IO[str], refresh_s: float):
        self.stream, self.refresh_s = stream, refresh_s
        self.tty = stream.isatty()
        self.drawn, self.last, self.states = 0, 0.0, {}
        self.t0 = time.time()

    def update(self, runs: list[LocalRun], force: bool = False) -> None:
        if self.tty:
            if force or time.monotonic() - self.last >= self.refresh_s:
                lines = _table(runs, self.t0)
                self.stream.write((f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines) + "\n")
                self.drawn, self.last = len(lines), time.monotonic()
        else:
            for r in runs:
                if self.states.get(r.member.slug) != r.state:
                    self.states[r.member.slug] = r.state
                    if r.state != "pending":
                        note = f" ({r.note})" if r.note else ""
                        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {r.member.slug}: {r.state}{note}\n")
        self.stream.flush()

    def close(self, runs: list[LocalRun]) -> None:
        if self.tty:
            self.update(runs, force=True)
        else:
            self.stream.write("\n".join(_table(runs, self.t0)) + "\n")
            self.stream.flush()


def run_local(sweep: Sweep, members: list[Member], opts: LocalOptions, budget_s: float = 0, refresh_s: float = 5,
              grace_s: float = 300, stream: IO[str] = sys.stderr, gpus: list[str] | None = None) -> list[LocalRun]:
    """Run ``members`` (those not finished) as described in the module docstring; returns their final states."""
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    lock = (sweep.out_dir / ".local-executor.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SubmissionError(f"{sweep.out_dir}: another `psm-train sweep --executor local` is running this sweep") from None
    packer = Packer(visible_gpus() if gpus is None else gpus, opts)
    cpu_threads = max(1, (os.cpu_count() or 1) // packer.limit) if not packer.free else None
    runs = [LocalRun(m) for m in members]
    display = _Display(stream, refresh_s)
    deadline = time.monotonic() + budget_s if budget_s else None
    stopping = False
    # SIGTERM (a scheduler's or a wrapper's time limit) stops the members like Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None

    def stop_all() -> None:
        nonlocal stopping
        stopping = True
        for r in runs:
            if r.state == "running" and r.signalled is None:
                r.proc.send_signal(signal.SIGTERM)
                r.signalled = time.monotonic()

    try:
        while True:
            try:
                if deadline is not None and time.monotonic() >= deadline and not stopping:
                    stop_all()
                for r in runs:
                    if r.state == "running":
                        over = r.signalled is not None and time.monotonic() - r.signalled > grace_s
                        if over and r.proc.poll() is None:
                            os.killpg(r.proc.pid, signal.SIGKILL)
                            r.proc.wait()
                        if r.proc.poll() is not None:
                            _finish(r, killed_after=grace_s if over else 0)
                            packer.give(r.gpus)
                for r in runs:
                    if stopping or r.state not in ("pending", "waiting"):
                        continue
                    if not start_branch(sweep, r.member):
                        r.state = "waiting"
                        continue
                    taken = packer.take()
                    if taken is None:
                        r.state = "pending"
                        break
                    _start(r, taken, cpu_threads)
                display.update(runs)
                if not any(r.state == "running" for r in runs):
                    break  # everything ran, or what is left waits for a checkpoint no running member will write
                time.sleep(0.2)
            except KeyboardInterrupt:
                if stopping:  # the second Ctrl-C: no more waiting for checkpoints
                    for r in runs:
                        if r.state == "running" and r.proc.poll() is None:
                            os.killpg(r.proc.pid, signal.SIGKILL)
                    raise
                stream.write("interrupted (Ctrl-C or SIGTERM): stopping the running members (they save a checkpoint); "
                             "interrupt again to kill them\n")
                stop_all()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        display.close(runs)
        lock.close()
    return runs


def summary_lines(sweep: Sweep, runs: list[LocalRun]) -> list[str]:
    """What is left to do, for the end of the command."""
    lines = []
    for r in runs:
        if r.state == "waiting":
            parent = Path(sweep.member(r.member.parent).cfg.run_dir)
            why = (f"{r.member.parent} finished without keeping it (checkpoint.keep_every)"
                   if (parent / "final.pt").is_file() else f"{r.member.parent} has not saved it yet")
            lines.append(f"{r.member.slug}: waits for step {r.member.branch_step}: {why}")
    left = [r for r in runs if r.state in ("pending", "waiting", "stopped")]
    if left:
        lines.append(f"{len(left)} member(s) not finished: run the same command again to continue them")
    for r in runs:
        if r.state == "failed":
            _, err = log_paths(Path(r.member.cfg.run_dir) / "logs", str(r.proc.pid), 1)[0]
            lines.append(f"{r.member.slug}: failed ({r.note}); log: {err}")
    return lines
