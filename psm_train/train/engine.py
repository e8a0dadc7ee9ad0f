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
from psm_train.distributed.env import init_single_rank_group
from psm_train.train.optim import build_optimizer, param_groups

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


def step_counter(optimizer: torch.optim.Optimizer, step: int, device: torch.device) -> torch.Tensor | int:
    """AdamW's step count in the form the optimizer keeps it: a tensor on the parameters' device for the fused
    kernel, on the CPU otherwise, and a plain int for DeepSpeed's CPUAdam (its C++ update takes an int)."""
    if type(optimizer).__name__ == "DeepSpeedCPUAdam":
        return step
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return torch.tensor(float(step), device=device if fused else "cpu")


def check_names(model: nn.Module, state: dict[str, Any], where: str) -> None:
    expected = {n for n, _ in named_unique_parameters(model)}
    stored = set(state["params"])
    if expected != stored:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise ValueError(f"{where}: parameters differ from the model's (missing {missing[:5]}, unexpected {extra[:5]}); "
                         "was it saved with another model config?")


class GradientBuckets:
    """Every rank's gradients summed (all-reduce SUM), bucket by bucket, while the backward still runs.

    Each parameter's ``.grad`` is a view into its bucket's flat buffer, so autograd accumulates
    into the buffer and the all-reduce needs no copy. Buckets hold parameters in reverse
    registration order (about the order the backward finishes them); a bucket is launched
    asynchronously once the post-accumulate-grad hooks of all its parameters have fired. Buckets are
    launched strictly in index order, so every rank issues the same collectives in the same order
    even where ranks use different parameters; after the backward, the buckets still waiting (a
    parameter this rank did not use keeps its zero gradient) are launched too.

    ``overlap=False`` launches every bucket only after the backward (one bucket: one all-reduce).

    The buckets travel on a process group of their own: the backward of a sequence-parallel model
    runs collectives too (the exchanges' backward), and the ranks may reach those before or after a
    bucket is ready; on one group the two orders would deadlock. Collective: every rank constructs it.
    """

    def __init__(self, params: list[nn.Parameter], bucket_bytes: float, overlap: bool):
        self.overlap = overlap
        self.group = dist.new_group()
        self.buckets: list[list[nn.Parameter]] = []
        by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in reversed(params):
            by_dtype.setdefault((p.dtype, p.device), []).append(p)
        for same in by_dtype.values():
            bucket, size = [], 0
            for p in same:
                if bucket and size + p.numel() * p.element_size() > bucket_bytes:
                    self.buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(p)
                size += p.numel() * p.element_size()
            self.buckets.append(bucket)
        self.buffers = []
        self.bucket_of: dict[nn.Parameter, int] = {}
        self.views: list[tuple[nn.Parameter, torch.Tensor]] = []
        for i, bucket in enumerate(self.buckets):
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            self.buffers.append(flat)
            offset = 0
            for p in bucket:
                self.views.append((p, flat[offset : offset + p.numel()].view_as(p)))
                offset += p.numel()
                self.bucket_of[p] = i
        self.attach()
        self.handles: list[Any] = []
        self.ready = [0] * len(self.buckets)
        self.syncing = False  # this backward is the step's last: its hooks may launch buckets
        if overlap:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.syncing:
            return
        self.ready[self.bucket_of[p]] += 1
        self._launch(ready_only=True)

    def _launch(self, ready_only: bool) -> None:
        while len(self.handles) < len(self.buckets):
            i = len(self.handles)
            if ready_only and self.ready[i] < len(self.buckets[i]):
                return
            self.handles.append(dist.all_reduce(self.buffers[i], group=self.group, async_op=True))

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self.handles:
            raise RuntimeError("engine.backward after a synchronising backward (sync=True) of the same step: "
                               "with gradient accumulation pass sync=False for every micro-batch but the last")
        self.syncing = sync and self.overlap
        try:
            loss.backward()
        finally:
            self.syncing = False
        if sync:
            self._launch(ready_only=False)

    def attach(self) -> None:
        """Point every parameter's .grad at its slice of the buckets."""
        for p, view in self.views:
            p.grad = view

    def wait(self) -> None:
        """Block until every bucket is summed over the ranks (the step's last backward launched them)."""
        if len(self.handles) != len(self.buckets):
            raise RuntimeError("engine.step before a synchronising backward: the last micro-batch needs sync=True")
        for handle in self.handles:
            handle.wait()
        # A gradient outside the buckets was never summed: something replaced it (zero_grad(set_to_none=True)?).
        for p, view in self.views:
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                raise RuntimeError("a parameter's .grad was replaced during the step; the torch engine keeps the "
                                   "gradients in its buckets: leave zeroing them to engine.step")

    def zero(self) -> None:
        for flat in self.buffers:
            flat.zero_()
        self.attach()
        self.handles = []
        self.ready = [0] * len(self.buckets)


class TorchEngine:
    """Replicated parameters and AdamW; gradients summed over the ranks by `GradientBuckets` (none in a
    single process)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, par: ParallelConfig | None = None):
        par = par or ParallelConfig()
        self.module = model
        self.params = [p for _, p in named_unique_parameters(model)]
        self.optimizer = build_optimizer(model, cfg)
        self.grad_clip = cfg.grad_clip
        self.buckets = None
        if world()[1] > 1:
            self.buckets = GradientBuckets(self.params, par.bucket_mb * 2**20, overlap=par.grad_reduce == "overlapped")

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Accumulate loss's gradients; ``sync`` (the step's last micro-batch) also sums them over the ranks."""
        if self.buckets is None:
            loss.backward()
        else:
            self.buckets.backward(loss, sync)

    def reduce_gradients(self) -> None:
        """Wait for the summed gradients; afterwards every parameter has one (zeros where none flowed)."""
        if self.buckets is not None:
            self.buckets.wait()
            return
        for p in self.params:
            if p.grad is None:  # as on several ranks, where it is zero: AdamW still decays it and its moments
                p.grad = torch.zeros_like(p)

    def step(self, lr: float) -> torch.Tensor:
        """Reduce gradients, clip, step, zero; returns the gradient norm before clipping."""
        self.reduce_gradients()
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.buckets is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.buckets.zero()  # the gradients stay views into the buckets
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
                        "step": step_counter(self.optimizer, state["optimizer_step"], p.device),
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
        if par.offload_optimizer:
            # DeepSpeed refuses a client optimizer other than its CPUAdam with ZeRO-Offload (zero_force_ds_cpu_optimizer).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            pinned = next(model.parameters()).is_cuda  # pinning needs CUDA
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
            optimizer = DeepSpeedCPUAdam(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                         adamw_mode=True)
        else:
            optimizer = build_optimizer(model, cfg)
        if world()[0] == 0:
            where = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions (set TORCH_EXTENSIONS_DIR to move it)"
            print(f"DeepSpeed may compile its C++/CUDA extensions on first use (minutes, silently); cached in {where}",
                  flush=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                                  dist_init_required=False)
        self.module = self.engine.module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``sync`` is TorchEngine's; DeepSpeed knows the accumulation boundary from its own micro-batch count."""
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
                base.state[flat] = {"step": step_counter(base, step, flat.device), "exp_avg": torch.zeros_like(flat),
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
                        base.state[p] = {"step": step_counter(base, state["optimizer_step"], p.device),
                                         **{k: state[k][name].to(p.device).clone() for k in MOMENTS}}
                    continue
                safe_set_full_fp32_param(p, value.to(p.device))
                if state["optimizer_step"] is not None:
                    for k in MOMENTS:
                        safe_set_full_optimizer_state(p, state[k][name].to(p.device), k)
        if self.zero_stage and state["optimizer_step"] is not None:
            for flat, s in base.state.items():
                s["step"] = step_counter(base, state["optimizer_step"], flat.device)


def build_engine(model: nn.Module, cfg: TrainConfig, par: ParallelConfig, micro_batch: int, bf16: bool):
    if par.engine == "torch":
        return TorchEngine(model, cfg, par)
    device_type = model.parameters().__next__().device.type
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_single_rank_group(device_type)  # world size 1: DeepSpeed still wants a process group
    return DeepSpeedEngine(model, cfg, par, micro_batch, bf16)
