"""``psm-train jobs``: the jobs of a run (or of every member of a sweep), their states, last step
and loss, where their logs are, and the log tails of ranks that failed.

States come from SLURM (squeue for live jobs, sacct for finished ones when accounting is on) and
otherwise from the events the jobs recorded in ``run_dir/jobs.jsonl``. A run started by
``psm-train train`` (no jobs.jsonl) is shown from its own files: finished (final.pt), running (its
run-directory lock is held, by the pid named), or stopped (resumable from its newest checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from psm_train.launch import registry
from psm_train.launch.submit import log_paths
from psm_train.train.run_lock import lock_holder

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED"}
_FROM_EVENTS = {"submitted": "SUBMITTED", "started": "RUNNING", "requeued": "REQUEUED", "stopped": "STOPPED",
                "failed": "FAILED", "finished": "COMPLETED"}


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id (array members as ARRAYID_INDEX); ids SLURM does not know are left out."""
    if not job_ids:
        return {}
    wanted = set(job_ids)
    states: dict[str, str] = {}
    for line in _run(["squeue", "-h", "-r", "-o", "%i|%T"]).splitlines():  # -r: one line per array member
        jid, _, state = line.partition("|")
        if jid in wanted:
            states[jid] = state
    rest = sorted(wanted - set(states))
    if rest:
        for line in _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(rest)]).splitlines():
            jid, _, state = line.partition("|")
            if jid in wanted:
                states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def active_jobs(run_dirs: list[Path]) -> dict[Path, str]:
    """run dir -> id of its last SLURM job, for those whose last job is still queued or running."""
    last = {}
    for run_dir in run_dirs:
        subs = [e for e in registry.read(run_dir) if e["event"] == "submitted"]
        if subs and subs[-1]["executor"] == "slurm":
            last[run_dir] = subs[-1]["job_id"]
    states = slurm_states(list(last.values()))
    return {run_dir: jid for run_dir, jid in last.items() if states.get(jid) in ACTIVE}


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_records(run_dir: Path) -> list[dict[str, Any]]:
    """One record per job submitted for this run: its submission, its later events, its state."""
    events = registry.read(run_dir)
    jobs = {e["job_id"]: {"submitted": e, "events": []} for e in events if e["event"] == "submitted"}
    for e in events:
        if e["event"] != "submitted" and e.get("job_id") in jobs:
            jobs[e["job_id"]]["events"].append(e)
    slurm_ids = [jid for jid, j in jobs.items() if j["submitted"]["executor"] == "slurm"]
    states = slurm_states(slurm_ids)
    for jid, j in jobs.items():
        last = j["events"][-1]["event"] if j["events"] else "submitted"
        j["state"] = states.get(jid, _FROM_EVENTS[last])
        if j["submitted"]["executor"] == "local" and j["state"] in ("SUBMITTED", "RUNNING") and not _alive(jid):
            j["state"] = "LOST"  # a local job's id is its controller's pid; killed without a trace
    return list(jobs.values())


def last_metrics(run_dir: Path) -> tuple[int | None, float | None]:
    """(last logged step, last training loss) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    step = loss = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        step = record.get("step", step)
        loss = record.get("loss", loss)
    return step, loss


def total_steps(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("steps")


def is_run_dir(path: Path) -> bool:
    """Made by `psm-train submit` (jobs.jsonl) or by `psm-train train` (config.yaml, written at its start)."""
    return (path / registry.FILENAME).is_file() or (path / "config.yaml").is_file()


def run_dirs(path: Path) -> list[Path]:
    """The run directory itself, or every member run directory of a sweep directory."""
    if is_run_dir(path):
        return [path]
    members = sorted({p.parent for name in (registry.FILENAME, "config.yaml") for p in path.glob(f"*/{name}")})
    if not members:
        raise FileNotFoundError(f"{path}: no run here or in its subdirectories (expected a run directory, with "
                                f"config.yaml or {registry.FILENAME}, or a sweep directory)")
    return members


def newest_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest published checkpoint (not verified; training's load() does that)."""
    steps = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps, default=None)


def direct_run_state(run_dir: Path) -> tuple[str, str]:
    """(state, detail) of a run started by `psm-train train`: from final.pt, the run lock and the checkpoints."""
    if (run_dir / "final.pt").is_file():
        return "COMPLETED", f"final.pt in {run_dir}"
    holder = lock_holder(run_dir)
    if holder is not None:
        return "RUNNING", f"pid {holder.get('pid')} on {holder.get('host')}: {holder.get('command')}"
    step = newest_checkpoint(run_dir)
    if step is None:
        return "STOPPED", "no checkpoint: the same command starts it again from step 0"
    return "STOPPED", f"resumable from checkpoints/step_{step:09d}: run the same command again"


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return f"    ({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def failing_logs(job: dict[str, Any]) -> list[tuple[int, Path]]:
    """(rank, stderr path) of ranks whose log shows an error; rank 0's when none does."""
    sub = job["submitted"]
    paths = log_paths(Path(sub["log_folder"]), sub["job_id"], sub["tasks"])
    ranks = {e["rank"] for e in job["events"] if e["event"] == "failed"}
    for rank, (_, err) in enumerate(paths):
        if err.is_file() and "Traceback" in err.read_text(errors="replace"):
            ranks.add(rank)
    return [(r, paths[r][1]) for r in sorted(ranks or {0})]


def report(path: Path, tail_lines: int = 15) -> str:
    """The text ``psm-train jobs PATH`` prints."""
    rows = [("RUN", "JOB", "EXECUTOR", "STATE", "STEP", "LOSS", "REQUEUES", "LOG (task 0)")]
    details = []
    for run_dir in run_dirs(path):
        step, loss = last_metrics(run_dir)
        steps = total_steps(run_dir)
        step_text = "-" if step is None else f"{step}/{steps}" if steps else str(step)
        loss_text = "-" if loss is None else f"{loss:.4f}"
        records = job_records(run_dir)
        if not records:  # started by `psm-train train`, not submitted
            state, detail = direct_run_state(run_dir)
            rows.append((run_dir.name, "-", "train", state, step_text, loss_text, "-", "-"))
            details.append(f"{run_dir.name}: {detail}")
        for job in records:
            sub = job["submitted"]
            requeues = [e for e in job["events"] if e["event"] == "requeued"]
            out, _ = log_paths(Path(sub["log_folder"]), sub["job_id"], 1)[0]
            rows.append((run_dir.name, sub["job_id"], sub["executor"], job["state"], step_text, loss_text,
                         str(len(requeues)), str(out)))
            for e in job["events"]:
                if e["event"] in ("requeued", "stopped", "failed"):
                    details.append(f"{run_dir.name} job {sub['job_id']}: {e['event']} at {e['time']}: {e['reason']}")
            if job["state"] not in ACTIVE | {"COMPLETED", "SUBMITTED"}:
                for rank, err in failing_logs(job):
                    details.append(f"{run_dir.name} job {sub['job_id']} rank {rank}, last lines of {err}:\n"
                                   + _tail(err, tail_lines))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(table + ([""] + details if details else []))
