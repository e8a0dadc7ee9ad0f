"""Typed run configuration: YAML file + ``--set key=value`` overrides -> validated dataclasses.

Sections that choose an implementation (``model.name``, ``data.task``) are typed by the chosen
component's own config dataclass. Every error names the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from psm_train.errors import ConfigError  # noqa: F401  (also imported from here, as before psm_train.errors)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine: over all steps after warmup | wsd: warmup, stable at lr, then decay
    decay_steps: int = 0  # wsd: the decay (1 - sqrt) takes the last decay_steps steps; 0: no decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: evaluate only at the end
    eval_batches: int = 4
    eval_batch_size: int = 64
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_batches", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule: expected cosine or wsd, got {self.schedule!r}")
        if self.schedule == "cosine" and self.decay_steps:
            raise ValueError(f"decay_steps: {self.decay_steps} applies to schedule: wsd only "
                             "(cosine decays over every step after the warmup)")
        if self.decay_steps < 0 or (self.schedule == "wsd" and self.warmup_steps + self.decay_steps > self.steps):
            raise ValueError(f"decay_steps: expected an integer in [0, steps - warmup_steps] = "
                             f"[0, {self.steps - self.warmup_steps}], got {self.decay_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip: expected numbers >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: expected one of auto, fp32, bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected one of auto, cpu, cuda, got {self.device!r}")


@dataclass
class ParallelConfig:
    sp: int = 1  # sequence-parallel degree; data-parallel degree = world size / sp
    engine: str = "torch"  # torch (replicated, all-reduce) | deepspeed (ZeRO)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (engine: deepspeed)
    grad_accum: int = 1  # micro-batches per optimizer step; train.batch_size is the whole step's
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    # with activation_checkpointing: only every k-th block (in module order, the first included) is recomputed;
    # 1: all. Transformer-PSM's Inf runs each block over twice the tokens: k = 2 brings its saved activations
    # to the transformer's (tools/activation_memory.py).
    checkpoint_every: int = 1
    # torch.compile each transformer block (Block); affine blocks stay eager. auto: on GPU, except under ZeRO-3.
    compile_blocks: bool | str = "auto"
    # ZeRO-3 keeps parameters of at most this many elements whole on every rank instead of gathering them at
    # each use (DeepSpeed's stage3_param_persistence_threshold).
    zero3_persistence_threshold: int = 100_000
    # ZeRO-Offload: AdamW state and fp32 master weights in CPU memory, stepped there by DeepSpeed's CPUAdam
    # (a C++ extension DeepSpeed compiles on first use). Needs engine: deepspeed and zero_stage >= 1.
    offload_optimizer: bool = False
    # torch engine: overlapped reduces gradient buckets while the backward still runs (as DDP does);
    # after_backward all-reduces every gradient in one message after it (kept for comparison).
    grad_reduce: str = "overlapped"
    bucket_mb: float = 25.0  # size of one overlapped all-reduce, in MiB of gradients

    def validate(self) -> None:
        if self.sp <= 0 or self.grad_accum <= 0:
            raise ValueError("sp and grad_accum: expected positive integers")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: expected a positive integer, got {self.checkpoint_every}")
        if self.checkpoint_every != 1 and not self.activation_checkpointing:
            raise ValueError(f"checkpoint_every: {self.checkpoint_every} needs activation_checkpointing: true")
        if self.grad_reduce not in ("overlapped", "after_backward"):
            raise ValueError(f"grad_reduce: expected overlapped or after_backward, got {self.grad_reduce!r}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb: expected a positive number, got {self.bucket_mb}")
        if self.offload_optimizer and (self.engine != "deepspeed" or self.zero_stage < 1):
            raise ValueError(
                f"offload_optimizer: needs engine: deepspeed and zero_stage 1, 2 or 3 (got engine: {self.engine}, "
                f"zero_stage: {self.zero_stage})"
            )
        if self.zero3_persistence_threshold < 0:
            raise ValueError(f"zero3_persistence_threshold: expected an integer >= 0, got {self.zero3_persistence_threshold}")
        if self.engine not in ("torch", "deepspeed"):
            raise ValueError(f"engine: expected torch or deepspeed, got {self.engine!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage and self.engine != "deepspeed":
            raise ValueError(f"zero_stage: {self.zero_stage} needs engine: deepspeed")
        if self.compile_blocks not in (True, False, "auto"):
            raise ValueError(f"compile_blocks: expected true, false or auto, got {self.compile_blocks!r}")
        if self.compile_blocks is True and self.zero_stage == 3:
            raise ValueError(
                "compile_blocks: not supported with zero_stage 3 (its parameter gathering in module hooks is untested "
                "under torch.compile)"
            )


@dataclass
class CheckpointConfig:
    every: int = 0  # save a sharded checkpoint every this many steps (0: only when preempted)
    keep_last: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    resume: str = "auto"  # auto: continue from the newest complete checkpoint in the run dir | never
    on_save_error: str = "stop"  # a failed background write: stop at the next step | continue (warn, train on)

    def validate(self) -> None:
        if self.every < 0 or self.keep_every < 0:
            raise ValueError("every and keep_every: expected integers >= 0")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: expected an integer >= 1, got {self.keep_last}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"resume: expected auto or never, got {self.resume!r}")
        if self.on_save_error not in ("stop", "continue"):
            raise ValueError(f"on_save_error: expected stop or continue, got {self.on_save_error!r}")


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "psm-train"
    entity: str | None = None
    name: str | None = None  # default: the run name


@dataclass
class Choice:
    """A config section that selects a component by name and holds that component's typed config."""

    name: str
    config: Any


@dataclass
class RunConfig:
    name: str
    model: Choice
    data: Choice
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run_dir: str = ""  # default: runs/<name>

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_dir": self.run_dir,
            "model": {"name": self.model.name, **dataclasses.asdict(self.model.config)},
            "data": {"task": self.data.name, **dataclasses.asdict(self.data.config)},
            "train": dataclasses.asdict(self.train),
            "parallel": dataclasses.asdict(self.parallel),
            "checkpoint": dataclasses.asdict(self.checkpoint),
            "wandb": dataclasses.asdict(self.wandb),
        }


def _registries() -> tuple[dict[str, type], dict[str, type]]:
    from psm_train.data import TASK_CONFIGS
    from psm_train.models import MODEL_CONFIGS

    return MODEL_CONFIGS, TASK_CONFIGS


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp} at {where}")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required field missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
    return obj


def _build_choice(data: Any, key: str, registry: dict[str, type], where: str) -> Choice:
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(f"{where}.{key}: required (one of {', '.join(sorted(registry))})")
    data = dict(data)
    name = data.pop(key)
    if name not in registry:
        raise ConfigError(f"{where}.{key}: unknown {where} {name!r} (known: {', '.join(sorted(registry))})")
    return Choice(name, build_dataclass(registry[name], data, where))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value of {key} is not valid YAML ({problem}); quote a string, "
                          "write a list as [1, 2]") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str) -> RunConfig:
    """Typed, validated RunConfig from a plain dict; ``source`` prefixes every error message."""
    models, tasks = _registries()
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"top level: expected a mapping, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(known))})")
        cfg = RunConfig(
            name=_coerce(raw.get("name", Path(source).stem), str, "name"),
            model=_build_choice(raw.get("model"), "name", models, "model"),
            data=_build_choice(raw.get("data"), "task", tasks, "data"),
            train=build_dataclass(TrainConfig, raw.get("train", {}), "train"),
            parallel=build_dataclass(ParallelConfig, raw.get("parallel", {}), "parallel"),
            checkpoint=build_dataclass(CheckpointConfig, raw.get("checkpoint", {}), "checkpoint"),
            wandb=build_dataclass(WandbConfig, raw.get("wandb", {}), "wandb"),
            run_dir=_coerce(raw.get("run_dir", ""), str, "run_dir"),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / cfg.name)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        raw = apply_overrides(raw, list(overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config_from_dict(raw, str(path))


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node
    return out


def resume_differences(saved: dict[str, Any], current: RunConfig) -> tuple[list[str], list[str]]:
    """(model differences, other differences) between a checkpoint's config (``cfg.to_dict()`` as saved) and now.

    Each as "model.d_model: 64 (checkpoint) -> 32 (now)". Model differences are every field under ``model`` and
    the data's vocabulary size (``data.vocab_size``, where the task has one): a checkpoint cannot be resumed
    with another model. The rest (schedule, batch, data, parallelism...) may change on resume and should be
    recorded. ``run_dir`` is left out. A field the checkpoint predates counts only if it differs from its
    default, so adding a config field does not invalidate old checkpoints.
    """
    try:
        normalized = config_from_dict(dict(saved), "checkpoint config").to_dict()  # fills defaults of newer fields
    except (ConfigError, TypeError):
        normalized = saved  # written by code that had other fields: compare what is there
    before, now = _flatten(normalized, "", {}), _flatten(current.to_dict(), "", {})
    model, other = [], []
    for key in [*now, *(k for k in before if k not in now)]:
        if key == "run_dir" or before.get(key, _ABSENT) == now.get(key, _ABSENT):
            continue
        line = f"{key}: {_shown(before.get(key, _ABSENT))} (checkpoint) -> {_shown(now.get(key, _ABSENT))} (now)"
        (model if key.startswith("model.") or key == "data.vocab_size" else other).append(line)
    return model, other


_ABSENT = object()


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
