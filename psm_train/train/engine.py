"""How gradients are reduced and the optimizer stepped: plain PyTorch, or DeepSpeed ZeRO stages 0-3.

Both engines see the same loss: the sum of this rank's token losses divided by the number of
scored tokens of the whole global batch (every rank, every micro-batch). The gradient of a step
is then the SUM of every rank's gradient, which makes dp x sp training equal single-process
training on the same global batch, sequence-parallel exchanges included (their backward already
routes each slice's gradient to the rank that owns the input).

Both also save and load one canonical state, independent of the world size, the SP degree and the
ZeRO stage: for every parameter name, its fp32 value and its AdamW moments, plus the step count.
Parameter i is written by rank i % world_size, so no rank gathers the whole model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from psm_train.config import ParallelConfig, TrainConfig
from psm_train.train.optim import build_optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")


WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # inserted by activation checkpointing


def named_unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters in a fixed order, tied ones once, named as without activation checkpointing."""
    return [(n.replace(WRAPPER_PREFIX, ""), p) for n, p in model.named_parameters() if p.requires_grad]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_canonical(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole canonical state {"params", "exp_avg", "exp_avg_sq", "optimizer_step"} from every rank's part."""
    merged: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "optimizer_step": None}
    for part in parts:
        for key in ("params", *MOMENTS):
            merged[key].update(part[key])
        if part["optimizer_step"] is not None:
            merged["optimizer_step"] = part["optimizer_step"]
    return merged


def check_names(model: nn.Module, state: dict[str, Any], where: str) -> None:
    expected = {n for n, _ in named_unique_parameters(model)}
    stored = set(state["params"])
    if expected != stored:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise ValueError(f"{where}: parameters differ from the model's (missing {missing[:5]}, unexpected {extra[:5]}); "
                         "was it saved with another model config?")


class TorchEngine:
    """Replicated parameters and AdamW; one coalesced all-reduce (SUM) of all gradients per step."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.module = model
        self.params = [p for _, p in named_unique_parameters(model)]
        self.optimizer = build_optimizer(model, cfg)
        self.grad_clip = cfg.grad_clip

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> torch.Tensor:
        """Reduce gradients, clip, step, zero; returns the gradient norm before clipping."""
        params = self.params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world()[1] > 1:
            flat = torch._utils._flatten_dense_tensors([p.grad for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])):
                p.grad.copy_(g)
        norm = nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def _full(self) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        for name, p in named_unique_parameters(self.module):
            state = self.optimizer.state.get(p, {})
            yield name, p.detach(), {k: state[k] for k in MOMENTS if k in state}

    def _optimizer_step(self) -> int | None:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return steps[0] if steps else None

    def canonical_shard(self) -> dict[str, Any]:
        return canonical_shard(self._full(), self._optimizer_step())

    def load_canonical(self, state: dict[str, Any]) -> None:
        check_names(self.module, state, "checkpoint")
        with torch.no_grad():
            for name, p in named_unique_parameters(self.module):
                p.copy_(state["params"][name])
                if state["optimizer_step"] is not None:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(state["optimizer_step"])),
                        **{k: state[k][name].to(p.device, p.dtype).clone() for k in MOMENTS},
                    }


def canonical_shard(full: Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]], optimizer_step: int | None) -> dict[str, Any]:
    """This rank's part of the canonical state: every world_size-th parameter. ``full`` may be collective
    (ZeRO gathers a parameter on every rank), so every rank iterates it whole."""
    rank, size = world()
    out: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "optimizer_step": optimizer_step}
    for i, (name, value, moments) in enumerate(full):
        if i % size == rank:
            out["params"][name] = value.float()
            for k, v in moments.items():
                out[k][name] = v.float()
    return out


class DeepSpeedEngine:
    """DeepSpeed with the client AdamW and ZeRO stage ``zero_stage`` over the whole world.

    DeepSpeed averages gradients over its data-parallel ranks (here: every rank) and divides the
    loss by the gradient-accumulation steps; the loss is scaled back by both so that the step
    uses the summed gradient, like TorchEngine.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, par: ParallelConfig, micro_batch: int, bf16: bool):
        try:
            import deepspeed
        except ImportError as e:
            raise SystemExit("parallel.engine=deepspeed needs deepspeed: pip install deepspeed "
                             "(on CPU also export DS_ACCELERATOR=cpu)") from e
        self.ds = deepspeed
        self.zero_stage = par.zero_stage
        self.scale = world()[1] * par.grad_accum
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": par.grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": par.zero_stage,
                                  "stage3_param_persistence_threshold": par.zero3_persistence_threshold},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = build_optimizer(model, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                                  dist_init_required=False)
        self.module = self.engine.module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.scale)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches here; no optimizer step yet

    def step(self, lr: float) -> torch.Tensor:
        """The optimizer step at the accumulation boundary; returns the norm DeepSpeed measured before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float(norm if norm is not None else 0.0))

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions, one per parameter group: what the base AdamW actually steps."""
        if self.zero_stage == 3:
            return self.optimizer.fp32_partitioned_groups_flat
        return self.optimizer.single_partition_of_fp32_groups

    def _link_moments(self, step: int) -> None:
        """Make AdamW's moments reachable per parameter: create them (zeros) if no step has run yet, and
        relink them. ZeRO-1/2 links its fragments during the first step while ``param_groups`` holds only
        group 0 (DeepSpeed 0.19), so the other groups' parameters would report no exp_avg."""
        base = self._base_optimizer()
        for flat in self._flat_partitions():
            if flat not in base.state or "exp_avg" not in base.state[flat]:
                base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
        if self.zero_stage in (1, 2):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _optimizer_step(self) -> int | None:
        steps = [int(s["step"]) for s in self._base_optimizer().state.values() if "step" in s]
        return max(steps) if steps else None

    def _full(self) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.zero_stage == 0:
            state = self._base_optimizer().state
            for name, p in named_unique_parameters(self.module):
                yield name, p.detach(), {k: state[p][k] for k in MOMENTS if k in state.get(p, {})}
            return
        step = self._optimizer_step()
        has_moments = step is not None
        if has_moments:
            self._link_moments(step)
        for name, p in named_unique_parameters(self.module):
            moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS} if has_moments else {}
            yield name, safe_get_full_fp32_param(p), {k: v for k, v in moments.items() if v is not None}

    def canonical_shard(self) -> dict[str, Any]:
        return canonical_shard(self._full(), self._optimizer_step())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights on every rank (collective under ZeRO)."""
        return {name: value.float().cpu() for name, value, _ in self._full()}

    def load_canonical(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        check_names(self.module, state, "checkpoint")
        base = self._base_optimizer()
        if self.zero_stage and state["optimizer_step"] is not None:
            self._link_moments(state["optimizer_step"])
        with torch.no_grad():
            for name, p in named_unique_parameters(self.module):
                value = state["params"][name]
                if self.zero_stage == 3:
                    with self.ds.zero.GatheredParameters([p], modifier_rank=0):
                        if world()[0] == 0:
                            p.copy_(value)
                else:
                    p.copy_(value)
                if self.zero_stage == 0:
                    if state["optimizer_step"] is not None:
                        base.state[p] = {"step": torch.tensor(float(state["optimizer_step"])),
                                         **{k: state[k][name].to(p.device).clone() for k in MOMENTS}}
                    continue
                safe_set_full_fp32_param(p, value.to(p.device))
                if state["optimizer_step"] is not None:
                    for k in MOMENTS:
                        safe_set_full_optimizer_state(p, state[k][name].to(p.device), k)
        if self.zero_stage and state["optimizer_step"] is not None:
            for s in base.state.values():
                s["step"] = torch.tensor(float(state["optimizer_step"]))


def build_engine(model: nn.Module, cfg: TrainConfig, par: ParallelConfig, micro_batch: int, bf16: bool):
    if par.engine == "torch":
        return TorchEngine(model, cfg)
    if model.parameters().__next__().device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DeepSpeedEngine(model, cfg, par, micro_batch, bf16)
