"""Plot training loss and eval accuracy of one or more runs from their metrics.jsonl, and print each
run's evaluations as a markdown table (accuracy per evaluation length and step).

    python tools/plot_metrics.py runs/quickstart runs/other --out curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {run_dir} a psm-train run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dirs: list[Path], out: Path) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        train = [r for r in records if "loss" in r]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=run_dir.name)
        acc_keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith("/acc")})
        for key in acc_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax_acc.plot(*zip(*points), marker="o", label=f"{run_dir.name} {key.split('/')[1]}")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy on scored positions", ylim=(0, 1), title="evaluation")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def eval_table(run_dir: Path) -> str:
    """Markdown: one row per evaluation length, one column per evaluated step."""
    records = read_metrics(run_dir)
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith("/acc")},
                  key=lambda k: int(k.split("/")[1].removeprefix("len")))
    steps = sorted({r["step"] for r in records if any(k in r for k in keys)})
    if not keys:
        return f"{run_dir}: no evaluation logged"
    lines = [f"{run_dir}", "", "| length | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for key in keys:
        by_step = {r["step"]: r[key] for r in records if key in r}
        lines.append(f"| {key.split('/')[1].removeprefix('len')} | "
                     + " | ".join(f"{by_step[s]:.3f}" if s in by_step else "–" for s in steps) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    args = parser.parse_args()
    plot(args.run_dirs, args.out)
    for run_dir in args.run_dirs:
        print(eval_table(run_dir) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
