"""A run's training state in a sharded checkpoint: what each rank saves, and how a run continues.

Each rank saves its part of the engine's canonical state (world-size independent, see
`psm_train.train.engine`) and its RNG state; the metadata holds the step, the tokens seen, the data
cursor and the config, so a run resumes at another world size, SP degree or ZeRO stage.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from psm_train.checkpoint import CheckpointStore, StoredCheckpoint
from psm_train.config import RunConfig
from psm_train.distributed.layout import ParallelLayout
from psm_train.train.engine import merge_canonical


def code_version() -> str:
    """The git commit of the code that ran (with '+dirty' for local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import version

        return f"psm-train {version('psm-train')}"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_dropout(seed: int, rank: int, start: int) -> None:
    """Every rank initialised the same weights from the shared seed; from here on the global RNG only
    draws dropout masks, which must differ between ranks (a sequence's slices included) and, after a
    resume at another world size, from the masks of the run's first steps."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, start]).generate_state(1)[0]))


def resume_step(source, cursor: dict, global_batch_size: int, checkpoint_step: int) -> int:
    """The step to continue at, after checking that the data would continue the same sample order."""
    if hasattr(source, "check_cursor"):
        return source.check_cursor(cursor, global_batch_size)
    expected = source.cursor(checkpoint_step, global_batch_size)
    if cursor != expected:
        raise SystemExit(f"data cursor in the checkpoint {cursor} differs from this config's {expected}: "
                         "resuming would not continue the same sample order (was data.* or train.seed changed?)")
    return checkpoint_step


def save_state(store: CheckpointStore, step: int, engine, source, cfg: RunConfig, layout: ParallelLayout,
               device: torch.device, tokens: int, version: str) -> float:
    """Save this rank's part of the training state after ``step``; returns the seconds training was blocked."""
    shard = {"engine": engine.canonical_shard(), "rng": rng_state(device)}
    meta = {"step": step, "tokens": tokens, "data_cursor": source.cursor(step, cfg.train.batch_size), "vocab_size": source.vocab_size,
            "world_size": layout.world_size, "dp": layout.dp, "sp": layout.sp, "engine": cfg.parallel.engine,
            "zero_stage": cfg.parallel.zero_stage, "config": cfg.to_dict(), "code_version": version, "finite": True}
    return store.save(step, shard, meta)


def load_state(ckpt: StoredCheckpoint, engine, source, cfg: RunConfig, layout: ParallelLayout,
               device: torch.device) -> tuple[int, int]:
    """Load the engine (and, at the same world size, this rank's RNG) from ``ckpt``; returns (step, tokens)."""
    files = [ckpt.read(r) for r in range(ckpt.world_size)]
    engine.load_canonical(merge_canonical([f["engine"] for f in files]))
    start = resume_step(source, ckpt.meta["data_cursor"], cfg.train.batch_size, ckpt.step)
    if ckpt.world_size == layout.world_size:
        restore_rng(files[layout.rank]["rng"], device)
    return start, ckpt.meta["tokens"]


def describe_resume(ckpt: StoredCheckpoint, start: int) -> str:
    note = f" (skipped: {'; '.join(ckpt.skipped)})" if ckpt.skipped else ""
    return f"resumed from {ckpt.path} at step {start} (saved by {ckpt.world_size} ranks){note}"

