"""Sweep files: a grid and/or a list over any config fields, one run directory per member.

    name: families                 # default: the file's stem
    config: ../quickstart.yaml     # the base config, relative to this file
    out_dir: runs/sweeps/families  # default runs/sweeps/<name>; members go to <out_dir>/<member>
    set: {train.steps: 300}        # applied to every member
    grid: {train.lr: [1.0e-3, 3.0e-3]}       # cartesian product of the value lists
    list:                                     # members given one by one (a whole section may be replaced)
      - {model: {name: transformer, d_model: 32, n_layers: 2}}
      - {model.name: transformer_psm, model.d_model: 32}
    slurm: {time: 30, cpus_per_task: 1, array_parallelism: 4}   # Resources fields

With both ``grid`` and ``list`` every list entry is combined with every grid point; the entry is
applied first, so a grid key such as ``model.d_model`` refines a model section the entry replaced. A member is
finished when its run directory holds final.pt; re-submitting a sweep skips finished members and
members whose job is still queued or running, and submits the others (which resume from their
checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from psm_train.config import ConfigError, RunConfig, load_config
from psm_train.launch.jobs import active_jobs
from psm_train.launch.submit import Resources

_KEYS = {"name", "config", "out_dir", "set", "grid", "list", "slurm"}


@dataclass
class Member:
    slug: str  # the run directory's name, derived from the member's values
    values: dict[str, Any]  # dotted key -> value, on top of the sweep's `set`
    cfg: RunConfig


@dataclass
class Sweep:
    name: str
    path: Path
    out_dir: Path
    members: list[Member]
    resources: Resources


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
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.parent / raw["config"]
    out_dir = Path(raw.get("out_dir", Path("runs") / "sweeps" / name)).absolute()
    members = []
    for values in member_values(_mapping(raw.get("grid", {}), f"{path}: grid"), entries):
        s = slug(values)
        overrides = [*_overrides(common), *_overrides(values), f"name={name}-{s}", f"run_dir={out_dir / s}"]
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep {path}, member {s}: {e}") from None
        members.append(Member(s, values, cfg))
    dupes = sorted({m.slug for m in members if [n.slug for n in members].count(m.slug) > 1})
    if dupes:
        raise ConfigError(f"{path}: members {dupes[0]!r} appear more than once (grid and list overlap?)")
    return Sweep(name, path, out_dir, members, Resources(**slurm))


def member_status(members: list[Member]) -> dict[str, str]:
    """slug -> 'finished' | 'active <job id>' | 'new' | 'resume'."""
    active = active_jobs([Path(m.cfg.run_dir) for m in members])
    status = {}
    for m in members:
        run_dir = Path(m.cfg.run_dir)
        if (run_dir / "final.pt").is_file():
            status[m.slug] = "finished"
        elif run_dir in active:
            status[m.slug] = f"active {active[run_dir]}"
        else:
            status[m.slug] = "resume" if (run_dir / "metrics.jsonl").is_file() else "new"
    return status
