"""AdamW with weight decay on matrices only, and the learning-rate schedules: warmup then cosine, or
warmup-stable-decay (WSD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from psm_train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Decay 2-D weights (linear layers, embeddings); leave norms, biases and gains alone."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`: the fused kernel on CUDA (a few launches per step instead of several per
    parameter), the multi-tensor (foreach) one elsewhere."""
    groups = param_groups(model, cfg)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    kernel = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kernel)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``, then

    - cosine: cosine from lr to lr * min_lr_ratio over the remaining steps;
    - wsd: constant lr, then over the last ``decay_steps`` steps lr * (1 - sqrt(progress)) down to
      lr * min_lr_ratio, reached at the last step. The stable phase does not depend on ``steps``, so a
      checkpoint taken in it can be continued with a decay to any later end (a decay branch).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.steps - cfg.decay_steps
        if step < decay_start or not cfg.decay_steps:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / cfg.decay_steps)
        return floor + (cfg.lr - floor) * (1 - math.sqrt(progress))
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
