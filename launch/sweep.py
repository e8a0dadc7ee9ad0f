"""Sweep files: a grid and/or a list over any config fields, one run directory per member, and decay
branches of warmup-stable-decay runs.

    name: families                 # default: the file's stem
    config: ../mqar_tiny.yaml      # the base config, relative to this file
    out_dir: runs/sweeps/families  # default runs/sweeps/<name>; members go to <out_dir>/<member>
    set: {train.steps: 300}        # applied to every member
    grid: {train.lr: [1.0e-3, 3.0e-3]}       # cartesian product of the value lists
    list:                                     # members given one by one (a whole section may be replaced)
      - {model: {name: transformer, d_model: 32, n_layers: 2}}
      - {model.name: transformer_psm, model.d_model: 32}
      - {name: gla_small, config: ../gla.yaml}   # name: the member's run directory (with a grid:
                                                 # gla_small,<grid values>); config: its own base
    branches:                      # decay branches (see below); needs train.schedule: wsd
      steps: [400, 800]            # one branch per member and value: the branch's train.steps
      decay_fraction: 0.2          # its decay takes the last 20% of its steps (or decay_steps: N)
      set: {train.eval_every: 0}   # applied to the branches only
    slurm: {time: 30, cpus_per_task: 1, array_parallelism: 4}   # Resources fields
    local: {per_gpu: 4, max_parallel: 8}                        # LocalOptions fields (--executor local)

With both ``grid`` and ``list`` every list entry is combined with every grid point; the entry is
applied first, so a grid key such as ``model.d_model`` refines a model section the entry replaced. A member is
finished when its run directory holds final.pt; re-submitting a sweep skips finished members and
members whose job is still queued or running, and submits the others (which resume from their
checkpoints).

Decay branches: every member of the grid/list is a stable run; for each value T of ``branches.steps``
a branch member trains to T steps, its decay over the last ``decay`` steps (``decay_steps``, or
``decay_fraction`` × T rounded). It starts from the stable run's checkpoint at the branch point
S = T - decay, which is copied (hard links) into the branch's run directory before the branch first
runs; the trainer then resumes from it as from its own. A branch may change train and checkpoint
fields, not the model, the data, the batch, the seed, lr or the warmup. The stable run must save a
checkpoint at every branch point and keep it: checkpoint.every and checkpoint.keep_every dividing
every S, and S within its stable phase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from psm_train.config import ConfigError, RunConfig, load_config
from psm_train.launch.jobs import active_jobs
from psm_train.launch.submit import Resources

_KEYS = {"name", "config", "out_dir", "set", "grid", "list", "branches", "slurm", "local"}
_BRANCH_KEYS = {"steps", "decay_fraction", "decay_steps", "set"}
_ENTRY_KEYS = {"name", "config"}  # list-entry keys that are not config overrides
# What a branch must share with the run it continues: the weights' shapes, the data order, the stable phase.
_BRANCH_SAME = ("model", "data", "train.batch_size", "train.seed", "train.lr", "train.warmup_steps")


@dataclass
class LocalOptions:
    """How ``--executor local`` packs members onto this machine (the sweep file's ``local`` section)."""

    max_parallel: int = 0  # members running at once; 0: per_gpu x GPUs, or 1 without GPUs
    per_gpu: int = 1  # members sharing one GPU (each sees only its GPU through CUDA_VISIBLE_DEVICES)
    gpus_per_member: int = 1  # > 1: each member trains on this many whole GPUs (torchrun, one rank per GPU)

    def validate(self) -> None:
        if self.max_parallel < 0 or self.per_gpu < 1 or self.gpus_per_member < 1:
            raise ConfigError("local: max_parallel must be >= 0, per_gpu and gpus_per_member >= 1")
        if self.per_gpu > 1 and self.gpus_per_member > 1:
            raise ConfigError("local: per_gpu > 1 packs members onto one GPU, gpus_per_member > 1 spreads one "
                              "over several; choose one")


@dataclass
class Member:
    slug: str  # the run directory's name, derived from the member's values (or the entry's name)
    values: dict[str, Any]  # dotted key -> value, on top of the sweep's `set`; branches add branch.steps
    cfg: RunConfig
    parent: str | None = None  # a decay branch: the slug of the stable member it continues
    branch_step: int = 0  # a decay branch: the stable member's checkpoint step it starts from


@dataclass
class Sweep:
    name: str
    path: Path
    out_dir: Path
    members: list[Member]
    resources: Resources
    local: LocalOptions = dataclasses.field(default_factory=LocalOptions)

    def member(self, slug: str) -> Member:
        return next(m for m in self.members if m.slug == slug)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {value!r}")
    return value


def member_values(grid: dict[str, Any], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    # entry first: a list entry may replace a whole section, which the grid's dotted keys then refine
    return [{**entry, **point} for entry in (entries or [{}]) for point in points]


def slug(values: dict[str, Any]) -> str:
    """'model.name=gla,lr=0.001': short keys where unambiguous, filesystem-safe, bounded length."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):  # a replaced section: name it by its fields
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    last = [k.split(".")[-1] for k in flat]
    keys = [s if last.count(s) == 1 else k for k, s in zip(flat, last)]
    text = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in zip(keys, flat.values()))
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "base"
    if len(text) > 80:
        text = text[:71] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # JSON is YAML: load_config reads it back


def _member(path: Path, name: str, out_dir: Path, common: dict[str, Any], values: dict[str, Any], base: str,
            extra: list[str] = (), member_slug: str | None = None) -> tuple[str, RunConfig]:
    """(slug, validated config) of one member. A list entry's ``name`` names the member (else its values do,
    a ``config`` other than the base by its file's stem); neither is a config override."""
    overrides_of = {k: v for k, v in values.items() if k not in _ENTRY_KEYS}
    if "name" in values and not re.fullmatch(r"[A-Za-z0-9._=,+-]+", str(values["name"])):
        raise ConfigError(f"{path}: member name {values['name']!r}: use letters, digits and ._=,+- only "
                          "(it names a directory)")
    own_config = {"config": Path(values["config"]).stem} if "config" in values else {}
    s = member_slug or (str(values["name"]) if "name" in values else slug({**own_config, **overrides_of}))
    overrides = [*_overrides(common), *_overrides(overrides_of), *extra,
                 f"name={s if 'name' in values else f'{name}-{s}'}", f"run_dir={out_dir / s}"]
    try:
        return s, load_config(path.parent / values.get("config", base), overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep {path}, member {s}: {e}") from None


def _get(cfg: RunConfig, dotted: str) -> Any:
    section, _, field = dotted.partition(".")
    node = getattr(cfg, section)
    return getattr(node, field) if field else node


def _branch_decays(spec: dict[str, Any], where: str) -> list[tuple[int, int]]:
    """[(T, decay steps)] from the ``branches`` section."""
    bad = sorted(set(spec) - _BRANCH_KEYS)
    if bad:
        raise ConfigError(f"{where}.{bad[0]}: unknown key (known: {', '.join(sorted(_BRANCH_KEYS))})")
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(t, int) and t > 0 for t in steps):
        raise ConfigError(f"{where}.steps: expected a non-empty list of positive step counts, got {steps!r}")
    if ("decay_fraction" in spec) == ("decay_steps" in spec):
        raise ConfigError(f"{where}: give one of decay_fraction (of each branch's steps) or decay_steps")
    if "decay_fraction" in spec:
        frac = spec["decay_fraction"]
        if not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ConfigError(f"{where}.decay_fraction: expected a number in (0, 1), got {frac!r}")
        return [(t, max(1, round(frac * t))) for t in steps]
    decay = spec["decay_steps"]
    if not isinstance(decay, int) or decay < 1:
        raise ConfigError(f"{where}.decay_steps: expected a positive integer, got {decay!r}")
    too_short = [t for t in steps if t <= decay]
    if too_short:
        raise ConfigError(f"{where}.steps: {too_short[0]} is not longer than decay_steps {decay}")
    return [(t, decay) for t in steps]


def _check_branch_point(parent: Member, branch_slug: str, step: int, points: list[int]) -> None:
    t, ck = parent.cfg.train, parent.cfg.checkpoint
    stable_end = t.steps - t.decay_steps
    if t.schedule != "wsd":
        raise ConfigError(f"member {parent.slug}: train.schedule is {t.schedule}; decay branches continue the "
                          "stable phase of a wsd run (set train.schedule: wsd)")
    if not t.warmup_steps <= step <= stable_end:
        raise ConfigError(f"branch {branch_slug}: its decay starts at step {step}, outside the stable phase "
                          f"[{t.warmup_steps}, {stable_end}] of {parent.slug} (train.steps {t.steps}, decay_steps "
                          f"{t.decay_steps}): lengthen the stable run or shorten the branch")
    if not ck.every or step % ck.every or not ck.keep_every or step % ck.keep_every:
        g = math.gcd(*points)
        raise ConfigError(f"member {parent.slug}: no kept checkpoint at step {step}, where branch {branch_slug} starts "
                          f"(checkpoint.every {ck.every}, keep_every {ck.keep_every}); set both to a divisor of every "
                          f"branch point {sorted(set(points))}, e.g. {g}")


def _branches(path: Path, name: str, out_dir: Path, common: dict[str, Any], spec: dict[str, Any],
              stable: list[Member], base: str) -> list[Member]:
    decays = _branch_decays(spec, "branches")
    extra_set = _mapping(spec.get("set", {}), "branches.set")
    points = [t - d for t, d in decays]
    out = []
    for parent in stable:
        for t, decay in decays:
            values = {**parent.values, "branch.steps": t}
            s = f"{parent.slug},branch={t}"
            if len(s) > 80:
                s = slug({k: v for k, v in values.items() if k not in _ENTRY_KEYS})
            _check_branch_point(parent, s, t - decay, points)
            extra = [*_overrides(extra_set), f"train.steps={t}", "train.schedule=wsd", f"train.decay_steps={decay}",
                     "checkpoint.keep_every=0"]
            _, cfg = _member(path, name, out_dir, common, {k: v for k, v in values.items() if k != "branch.steps"},
                             base, extra, member_slug=s)
            for key in _BRANCH_SAME:
                if _get(cfg, key) != _get(parent.cfg, key):
                    raise ConfigError(f"branch {s}: {key} differs from {parent.slug}'s ({_get(cfg, key)!r} vs "
                                      f"{_get(parent.cfg, key)!r}); a branch continues its stable run's weights, "
                                      "data order and stable learning rate")
            if cfg.checkpoint.resume != "auto":
                raise ConfigError(f"branch {s}: checkpoint.resume must be auto (it resumes from {parent.slug}'s "
                                  "checkpoint)")
            out.append(Member(s, values, cfg, parent=parent.slug, branch_step=t - decay))
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and every member's config (nothing is submitted here)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        unknown = sorted(set(_mapping(raw, "top level")) - _KEYS)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
        if "config" not in raw:
            raise ConfigError("config: required (the base config, relative to the sweep file)")
        name = str(raw.get("name", path.stem))
        common = _mapping(raw.get("set", {}), "set")
        entries = raw.get("list", [])
        if not isinstance(entries, list):
            raise ConfigError(f"list: expected a list of mappings, got {entries!r}")
        entries = [_mapping(e, f"list[{i}]") for i, e in enumerate(entries)]
        fields = {f.name for f in dataclasses.fields(Resources)}
        slurm = _mapping(raw.get("slurm", {}), "slurm")
        bad = sorted(set(slurm) - fields)
        if bad:
            raise ConfigError(f"slurm.{bad[0]}: unknown field (known: {', '.join(sorted(fields))})")
        local_raw = _mapping(raw.get("local", {}), "local")
        local_fields = {f.name for f in dataclasses.fields(LocalOptions)}
        bad = sorted(set(local_raw) - local_fields)
        if bad:
            raise ConfigError(f"local.{bad[0]}: unknown field (known: {', '.join(sorted(local_fields))})")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in local_raw.values()):
            raise ConfigError(f"local: expected integers, got {local_raw!r}")
        local = LocalOptions(**local_raw)
        local.validate()
        branch_spec = _mapping(raw["branches"], "branches") if "branches" in raw else None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    out_dir = Path(raw.get("out_dir", Path("runs") / "sweeps" / name)).absolute()
    members = []
    grid = _mapping(raw.get("grid", {}), f"{path}: grid")
    for values in member_values(grid, entries):
        if values.get("config") == raw["config"]:
            del values["config"]  # the base config: not a swept value
        named = f"{values['name']},{slug({k: values[k] for k in grid})}" if "name" in values and grid else None
        s, cfg = _member(path, name, out_dir, common, values, raw["config"], member_slug=named)
        members.append(Member(s, values, cfg))
    if branch_spec is not None:
        try:
            members += _branches(path, name, out_dir, common, branch_spec, list(members), raw["config"])
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("sweep ") else f"{path}: {e}") from None
    dupes = sorted({m.slug for m in members if [n.slug for n in members].count(m.slug) > 1})
    if dupes:
        raise ConfigError(f"{path}: members {dupes[0]!r} appear more than once (grid and list overlap?)")
    return Sweep(name, path, out_dir, members, Resources(**slurm), local)


def member_status(sweep: Sweep) -> dict[str, str]:
    """slug -> 'finished' | 'active <job id>' | 'new' | 'resume' | 'waiting' (a branch whose stable run has not
    saved its branch point yet)."""
    from psm_train.launch.branch import branch_source, has_started

    active = active_jobs([Path(m.cfg.run_dir) for m in sweep.members])
    status = {}
    for m in sweep.members:
        run_dir = Path(m.cfg.run_dir)
        if (run_dir / "final.pt").is_file():
            status[m.slug] = "finished"
        elif run_dir in active:
            status[m.slug] = f"active {active[run_dir]}"
        elif m.parent is not None and not has_started(run_dir) and branch_source(sweep, m) is None:
            status[m.slug] = "waiting"
        else:
            status[m.slug] = "resume" if (run_dir / "metrics.jsonl").is_file() else "new"
    return status
