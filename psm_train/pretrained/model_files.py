"""Whole-model files: final.pt at the end of a run, and loading any checkpoint form as a model.

Training state (sharded, resumable) lives in psm_train.checkpoint; this module deals in whole
models for evaluation, generation and export. Nothing here unpickles arbitrary objects: ``.pt``
files are read with ``weights_only=True``, exports are safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psm_train.config import RunConfig, apply_overrides, config_from_dict

FORMAT_VERSION = 1


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], cfg: RunConfig, step: int,
                    vocab_size: int | None = None, code_version: str | None = None) -> None:
    """Write final.pt: weights, resolved config, step; under a temporary name, then renamed.

    ``vocab_size`` lets loading skip reading the run's data; ``code_version`` (the training code's
    commit) goes into exports.
    """
    payload = {"format_version": FORMAT_VERSION, "model": weights, "config": cfg.to_dict(), "step": step}
    for key, value in (("vocab_size", vocab_size), ("code_version", code_version)):
        if value is not None:
            payload[key] = value
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def run_vocab_size(cfg: RunConfig, where: str) -> int:
    """The vocabulary of a run's data source (reads the shard manifest, or builds the synthetic task)."""
    from psm_train.data import build_source

    try:
        return build_source(cfg.data.name, cfg.data.config, cfg.train.seed).vocab_size
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{where}: the vocabulary size comes from the run's data, which cannot be read ({e})") from None


def _build(raw_config: dict[str, Any], overrides: list[str], where: str, vocab_size: int | None) -> tuple[nn.Module, RunConfig]:
    from psm_train.models import build_model

    cfg = config_from_dict(apply_overrides(raw_config, list(overrides)), f"{where} (stored config)")
    vocab_size = vocab_size if vocab_size is not None else run_vocab_size(cfg, where)
    return build_model(cfg.model.name, cfg.model.config, vocab_size), cfg


def _from_sharded(path: Path, overrides: list[str]) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """A training checkpoint: a step_* directory, or a run directory's newest complete one."""
    from psm_train.checkpoint import CheckpointStore
    from psm_train.train.engine import check_names, merge_canonical, named_unique_parameters

    root, step = (path.parent, int(path.name.split("_")[1])) if path.name.startswith("step_") else (path / "checkpoints", None)
    ckpt = CheckpointStore(root, rank=0, world_size=1).load(step)
    model, cfg = _build(ckpt.meta["config"], overrides, str(ckpt.path), ckpt.meta.get("vocab_size"))
    state = merge_canonical([ckpt.read(r)["engine"] for r in range(ckpt.world_size)])
    check_names(model, state, str(ckpt.path))
    with torch.no_grad():
        for name, p in named_unique_parameters(model):
            p.copy_(state["params"][name])
    return model, cfg, {"step": ckpt.step, "config": ckpt.meta["config"], "tokens": ckpt.meta.get("tokens"),
                        "code_version": ckpt.meta.get("code_version")}


def _from_safetensors(path: Path, overrides: list[str]) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """The single-file export of earlier versions: the run config as JSON metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "psm_train_config" not in meta:
        raise ValueError(f"{path}: not a psm-train export (no psm_train_config in its metadata)")
    raw = json.loads(meta["psm_train_config"])
    model, cfg = _build(raw, overrides, str(path), int(meta["vocab_size"]) if "vocab_size" in meta else None)
    load_model(model, str(path))
    return model, cfg, {"step": int(meta.get("step", 0)), "config": raw}


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """(model on CPU in eval mode, its config with ``overrides`` applied, {"step", "config", ...}).

    ``path``: a run directory (final.pt, else its newest training checkpoint), final.pt or another
    .pt file, a training checkpoint directory (step_*), or a single-file .safetensors export.
    An export directory (`psm_train.pretrained.load_pretrained`) carries no run config: it is not
    read here.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "final.pt").is_file():
        raise ValueError(f"{path}: an export directory (config.json) holds no training config; "
                         "use psm_train.load_pretrained, `psm-train generate` or `psm-train eval --text`")
    if path.is_dir() and not (path / "final.pt").is_file():
        model, cfg, info = _from_sharded(path, list(overrides))
    elif path.suffix == ".safetensors" and path.is_file():
        model, cfg, info = _from_safetensors(path, list(overrides))
    else:
        file = path / "final.pt" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint here (expected a run directory, a .pt or .safetensors file, "
                                    "or a checkpoints/step_* directory)")
        info = torch.load(file, map_location="cpu", weights_only=True)
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{file}: checkpoint format {info.get('format_version')} is not supported (expected {FORMAT_VERSION})")
        model, cfg = _build(info["config"], list(overrides), str(file), info.get("vocab_size"))
        model.load_state_dict(info["model"])
    model.eval()
    return model, cfg, info
