"""``psm-train sweep collect``: the final metrics of a sweep's finished members as rows for a scaling fit.

Each finished member's ``summary.json`` (written by the trainer next to ``final.pt``) gives one row:
member, family, N (unique parameters including embeddings), N_non_embedding, D (training tokens),
C = 6ND, the chosen loss, the metric's name and the swept values; C_model, the model's own training
FLOPs (``flops_per_token`` of psm_train/train/flops.py, as the trainer's MFU counts them, times D) where
the summary records them. 6ND counts parameters only: Transformer-PSM's Inf over 2c windows and its
Agg calls, and attention over the sequence, are in C_model. A decay branch is a member like any
other: its summary counts the tokens of the whole run (the stable part included), so each branch is
its own (N, D) point; its row also names the member it branched from and the step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psm_train.analysis.scaling import ScalingError
from psm_train.launch.sweep import Member, load_sweep


@dataclass
class Collected:
    rows: list[dict[str, Any]]
    unfinished: list[str]  # "slug: why"
    metric: str
    out_dir: Path  # the sweep's


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The member's summary.json, or None when the run has not finished."""
    path = run_dir / "summary.json"
    if not (run_dir / "final.pt").is_file() or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ScalingError(f"{path}: not valid JSON: {e}") from None
    for key in ("model", "n_params", "tokens"):
        if key not in summary:
            raise ScalingError(f"{path}: field {key!r} missing")
    return summary


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The metrics a fit may use: the flat eval metrics and train_loss."""
    out = dict(summary.get("eval") or {})
    if summary.get("train_loss") is not None:
        out["train_loss"] = summary["train_loss"]
    return out


def _eval_length(key: str) -> int:
    digits = re.findall(r"\d+", key.split("/")[1])
    return int(digits[0]) if digits else 0


def default_metric(summaries: list[dict[str, Any]]) -> str:
    """The eval loss at the shortest length all members have: in this repo's tasks that is the
    training length (longer ones measure extrapolation, not fit); train_loss without eval."""
    common = set.intersection(*(set(metrics(s)) for s in summaries))
    losses = [k for k in common if re.fullmatch(r"eval/[^/]+/loss", k)]
    if losses:
        return min(losses, key=lambda k: (_eval_length(k), k))
    if "train_loss" in common:
        return "train_loss"
    raise ScalingError("no loss metric common to every finished member (eval/*/loss or train_loss); "
                       "choose one with --metric")


def flat_values(values: dict[str, Any]) -> dict[str, Any]:
    """A member's swept values with replaced sections spelled as dotted keys, for CSV columns."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _row(member: Member, summary: dict[str, Any], metric: str, where: Path) -> dict[str, Any]:
    found = metrics(summary)
    if metric not in found:
        raise ScalingError(f"{where}: no metric {metric!r} (has: {', '.join(sorted(found)) or 'none'})")
    n, d = int(summary["n_params"]), int(summary["tokens"])
    branch = {"branch_of": member.parent, "branch_step": member.branch_step} if member.parent else {}
    return {"member": member.slug, "family": summary["model"], "N": n, "D": d, "C": 6.0 * n * d,
            "loss": float(found[metric]), "metric": metric,
            "N_non_embedding": summary.get("n_params_non_embedding", ""),
            "C_model": summary["flops_per_token"] * d if "flops_per_token" in summary else "",
            **branch, **flat_values(member.values)}


def collect(sweep_path: str | Path, metric: str | None = None) -> Collected:
    """Rows of the sweep's finished members; the others are listed as unfinished."""
    sweep = load_sweep(sweep_path)
    done: list[tuple[Member, dict[str, Any]]] = []
    unfinished = []
    for m in sweep.members:
        run_dir = Path(m.cfg.run_dir)
        summary = read_summary(run_dir)
        if summary is not None:
            done.append((m, summary))
        elif (run_dir / "final.pt").is_file():
            unfinished.append(f"{m.slug}: final.pt but no summary.json in {run_dir}")
        else:
            unfinished.append(f"{m.slug}: not finished (no final.pt in {run_dir})")
    if not done:
        raise ScalingError(f"sweep {sweep.name}: no finished member in {sweep.out_dir} "
                           f"(run `psm-train sweep {sweep_path}` first)")
    metric = metric or default_metric([s for _, s in done])
    rows = [_row(m, s, metric, Path(m.cfg.run_dir) / "summary.json") for m, s in done]
    return Collected(rows, unfinished, metric, sweep.out_dir)


