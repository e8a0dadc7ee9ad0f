"""Single-file checkpoint written at the end of a run (sharded checkpoints come with the distributed trainer).

The file holds only tensors and plain Python values, so loading uses ``weights_only=True`` and
never unpickles arbitrary objects. It is written to a temporary name and renamed, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psm_train.config import RunConfig, config_from_dict

FORMAT_VERSION = 1


def save_checkpoint(path: Path, model: nn.Module, cfg: RunConfig, step: int, extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "step": step,
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory holding final.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a .pt file or a run directory with final.pt)")
    return path


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """(model on CPU in eval mode, its config with ``overrides`` applied, the raw payload)."""
    from psm_train.config import apply_overrides
    from psm_train.models import build_model
    from psm_train.data import build_source

    path = resolve_checkpoint(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    cfg = config_from_dict(apply_overrides(payload["config"], list(overrides)), f"{path} (stored config)")
    vocab_size = build_source(cfg.data.name, cfg.data.config, cfg.train.seed).vocab_size
    model = build_model(cfg.model.name, cfg.model.config, vocab_size)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, cfg, payload
