"""Decay branches: a branch member's run directory starts as a copy of its stable run's checkpoint.

Before a branch first runs, the stable run's published ``checkpoints/step_<S>`` is hard-linked (copied
across file systems) into the branch's own ``checkpoints/`` and published there under the same
name, with the stable run's metrics.jsonl up to step S. The trainer then resumes from it as from a
checkpoint of its own: weights, optimizer state, data cursor and token count continue, while the
branch's config (its steps and decay) applies from step S on. Checkpoint files are never written in
place (a save publishes a new directory, retention renames and deletes), so either run may go on
saving and pruning without touching the other's files. ``branch.json`` records where the branch
came from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from psm_train.launch.sweep import Member, Sweep

_STEP_DIR = "step_{:09d}"  # psm_train.checkpoint.store's directory name of a published step


def has_started(run_dir: Path) -> bool:
    """Whether the run directory holds a result or a checkpoint of its own to resume from."""
    ckpts = run_dir / "checkpoints"
    return (run_dir / "final.pt").is_file() or (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()))


def branch_source(sweep: Sweep, member: Member) -> Path | None:
    """The stable run's published checkpoint this branch starts from, or None while it does not exist."""
    parent = sweep.member(member.parent)
    path = Path(parent.cfg.run_dir) / "checkpoints" / _STEP_DIR.format(member.branch_step)
    return path if (path / "manifest.json").is_file() else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # blank, or being written by the running stable run
        return float("inf")


def start_branch(sweep: Sweep, member: Member) -> bool:
    """Seed a branch's run directory from its stable run's checkpoint, once; False while that checkpoint is not
    published yet. A branch that has started (a checkpoint or final.pt of its own) is left as it is."""
    run_dir = Path(member.cfg.run_dir)
    if member.parent is None or has_started(run_dir):
        return True
    source = branch_source(sweep, member)
    if source is None:
        return False
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpts / f".tmp_{source.name}"  # a name the checkpoint store removes if this is interrupted
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    os.replace(tmp, ckpts / source.name)
    (ckpts / "latest").write_text(source.name + "\n")
    parent_dir = source.parent.parent
    metrics = parent_dir / "metrics.jsonl"
    if metrics.is_file():  # the branch's curves start with the stable run's
        lines = [line for line in metrics.read_text().splitlines() if _step(line) <= member.branch_step]
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run_dir / "branch.json").write_text(json.dumps({"parent": member.parent, "parent_run_dir": str(parent_dir),
                                                     "step": member.branch_step}, indent=1) + "\n")
    return True
