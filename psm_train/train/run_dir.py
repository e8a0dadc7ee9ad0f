"""A run directory: its lock, the checkpoint to resume from, config.yaml, and the files of a finished run.

    runs/<name>/config.yaml     the resolved config (with what changed on each resume recorded)
               metrics.jsonl    one record per logged step (psm_train.train.metrics)
               checkpoints/     sharded training state (psm_train.checkpoint)
               final.pt, eval.json, summary.json    written when the run finishes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from psm_train.checkpoint import CheckpointStore, StoredCheckpoint
from psm_train.config import ParallelConfig, RunConfig, resume_differences
from psm_train.train.evaluate import write_eval_json
from psm_train.train.metrics import truncate_metrics
from psm_train.train.run_lock import RunLock


class RunDir:
    """Entered by every rank: rank 0 holds the directory's lock while the run lasts, every rank opens the
    checkpoint store and finds the checkpoint to resume from (None for a fresh run)."""

    def __init__(self, cfg: RunConfig, proc):
        self.cfg = cfg
        self.path = Path(cfg.run_dir)
        self.main = proc.main
        self.rank, self.world_size = proc.env.rank, proc.env.world_size
        self.lock = RunLock(self.path) if self.main else None
        self.store: CheckpointStore | None = None
        self.checkpoint: StoredCheckpoint | None = None

    def __enter__(self) -> RunDir:
        if (self.path / "final.pt").exists():
            raise SystemExit(f"{self.path} already holds a finished run (final.pt); choose another --run-dir or remove it")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.lock is not None:
            self.lock.__enter__()
        ck = self.cfg.checkpoint
        self.store = CheckpointStore(self.path / "checkpoints", self.rank, self.world_size, keep_last=ck.keep_last,
                                     keep_every=ck.keep_every, on_save_error=ck.on_save_error)
        if ck.resume == "auto" and self.store.complete_steps():
            self.checkpoint = self.store.load()
        if dist.is_initialized():
            dist.barrier()  # every rank's store exists (rank 0 cleaned stale temporaries) before anyone saves
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.__exit__(*exc)

    def check_resume_config(self, vocab_size: int) -> None:
        """Refuse to resume a checkpoint of another model; record (and print) the other changes. Then write
        config.yaml and drop the metrics logged after the checkpoint."""
        changes: list[str] = []
        if self.checkpoint is not None:
            saved = self.checkpoint.meta["config"]
            model, changes = resume_differences(saved, self.cfg)
            saved_vocab = self.checkpoint.meta.get("vocab_size", vocab_size)
            if saved_vocab != vocab_size:
                model.append(f"data vocabulary size: {saved_vocab} (checkpoint) -> {vocab_size} (now)")
            if model:
                raise SystemExit(f"{self.checkpoint.path}: saved by another model; resuming it would fail or train "
                                 "something else. Differences:\n  " + "\n  ".join(model)
                                 + "\nUse another --run-dir, or the checkpoint's config.")
            if changes and self.main:
                print(f"resuming with a changed config (recorded in {self.path / 'config.yaml'}):\n  "
                      + "\n  ".join(changes), file=sys.stderr, flush=True)
        if not self.main:
            return
        resolved = self.cfg.to_dict()
        previous = self.path / "config.yaml"
        history = []
        if self.checkpoint is not None and previous.is_file():
            history = (yaml.safe_load(previous.read_text()) or {}).get("resumed_with_changes", [])
        if changes:
            history.append({"step": self.checkpoint.step, "changes": changes})
        if history:
            resolved["resumed_with_changes"] = history
        previous.write_text(yaml.safe_dump(resolved, sort_keys=False))
        if self.checkpoint is None:
            (self.path / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(self.path / "metrics.jsonl", self.checkpoint.step)

    def describe(self, cfg: RunConfig, n_params: int, par: ParallelConfig, device: torch.device, layout) -> str:
        where = f"{layout.dp} dp x {layout.sp} sp ranks on {device.type}" if layout.world_size > 1 else str(device)
        engine = f"{par.engine}{f' ZeRO-{par.zero_stage}' if par.engine == 'deepspeed' else ''}"
        line = f"{cfg.name}: {cfg.model.name} with {n_params / 1e6:.2f}M parameters, {where}, engine {engine}, run dir {self.path}"
        if cfg.train.warmup_steps >= cfg.train.steps:
            line += (f"\nwarning: train.warmup_steps = {cfg.train.warmup_steps} >= train.steps = {cfg.train.steps}: "
                     "the learning rate never reaches train.lr")
        return line

    def finish(self, weights: dict[str, torch.Tensor], final_eval: dict[int, dict], summary: dict[str, Any],
               vocab_size: int, version: str) -> None:
        """final.pt (its presence marks the run finished), eval.json and summary.json; rank 0 only."""
        from psm_train.pretrained.model_files import save_checkpoint

        save_checkpoint(self.path / "final.pt", weights, self.cfg, self.cfg.train.steps, vocab_size=vocab_size,
                        code_version=version)
        write_eval_json(self.path / "eval.json", final_eval)
        summary = {"name": self.cfg.name, "model": self.cfg.model.name, "steps": self.cfg.train.steps, **summary}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))
