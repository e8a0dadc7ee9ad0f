"""Figures and tables of docs/results.md from the output directories of `psm-train sweep` (the
results sweeps in configs/sweeps/results_*.yaml) and the JSON of tools/bench_generation.py.

    python tools/plot_results.py --runs RESULTS_DIR [RESULTS_DIR ...] --generation bench_generation.json --out-dir docs

Writes results_s5.png (accuracy against position at the longest S5 eval length, mean and range
over seeds; runs of a smaller symmetric group, data.degree < 5, get their group's name and chance
line), results_mqar.png (query accuracy against training length), results_mqar_distance.png (MQAR
accuracy by the chunk distance between query and key, for runs whose eval.json scores it), results_lm.png
(validation perplexity and training loss against step) and results_generation.png (ms per token
and state memory against context length), for whichever of those the inputs hold, and prints
the markdown tables. ``--tag _long`` writes results_s5_long.png etc. instead; ``--log-acc`` draws
the S5 accuracy on a logarithmic axis, with the level of a model that knows only the sign of the
permutation. For S5 it also prints, per run, the loss at the training length and the mean
accuracy over ranges of positions, beside the levels of knowing only that sign or nothing, and,
for runs evaluated since the evaluation scores it (eval.json's group_acc_by_position), the sign
accuracy itself. An MQAR run killed before its final evaluation is shown with its last logged
one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

S5_NAMES = {"psm_c1": "Transformer-PSM c=1", "transformer": "Transformer", "mamba2": "Mamba2"}
MQAR_NAMES = {"transformer": "Transformer", "psm_c32": "Transformer-PSM c=32", "psm_c64": "Transformer-PSM c=64", "gla": "GLA"}
LM_NAMES = {"transformer": "Transformer", "psm_c32": "Transformer-PSM c=32", "psm_c64": "Transformer-PSM c=64",
            "psm_c128": "Transformer-PSM c=128", "psm_c256": "Transformer-PSM c=256", "gla": "GLA"}


def _sweep_runs(d: Path) -> dict[str, dict]:
    """{member directory name: what the old runner's summary.json held} for a sweep's output directory."""
    out = {}
    for rd in sorted(p for p in d.iterdir() if (p / "config.yaml").is_file()):
        config = yaml.safe_load((rd / "config.yaml").read_text()) or {}
        elapsed = [r["elapsed_s"] for r in _metrics(rd) if "elapsed_s" in r]
        out[rd.name] = {"steps": config.get("train", {}).get("steps", "?"), "wall_s": elapsed[-1] if elapsed else 0}
    return out


def _metrics(rd: Path) -> list[dict]:
    path = rd / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _params(rd: Path) -> float | None:
    """Millions of parameters: from summary.json, else the trainer's first line in its log."""
    if (rd / "summary.json").is_file():
        return json.loads((rd / "summary.json").read_text())["n_params"] / 1e6
    for log in [rd / "log.txt", *sorted(rd.glob("logs/*_0_log.out"))]:
        if log.is_file():
            m = re.search(r"with ([\d.]+)M parameters", log.read_text())
            if m:
                return float(m.group(1))
    return None


def load_runs(dirs: list[Path]) -> dict[str, dict]:
    """{run name: {"eval", "metrics", "summary", "params", "config"}} over every result dir: a sweep's out_dir
    (`psm-train sweep`; run names are the member directories) or an old tools/bench_results.py directory."""
    runs = {}
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else None
        for name, info in (summary["runs"] if summary else _sweep_runs(d)).items():
            rd = d / name
            run = dict(summary=info, eval=None, metrics=_metrics(rd), params=_params(rd), config={})
            if (rd / "config.yaml").is_file():
                run["config"] = yaml.safe_load((rd / "config.yaml").read_text())
            if (rd / "eval.json").is_file():
                run["eval"] = json.loads((rd / "eval.json").read_text())
            runs[name] = run
    return runs


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def s5_group(name: str) -> tuple[int, str, str] | None:
    """(model order, group key, label) of an S5 run named s5_<model>[_<variant>][_s<seed>], or None.
    Runs that differ only in the seed form one group. Runs of a smaller symmetric group
    (data.degree < 5) are named the same way with s<degree>_ in front, e.g. s3_psm_c1_s0."""
    m = re.fullmatch(r"s[2-6]_(.+?)(?:_s\d+)?", name)
    if not m:
        return None
    key = m.group(1)
    bases = [k for k in S5_NAMES if key == k or key.startswith(k + "_")]
    if not bases:
        return None
    base = max(bases, key=len)
    variant = key[len(base) + 1 :].replace("_", ", ")
    return list(S5_NAMES).index(base), key, S5_NAMES[base] + (f" ({variant})" if variant else "")


def s5(experiments: list[tuple[str, dict]], png: Path, log_acc: bool = False) -> None:
    """One panel per experiment (results directory): accuracy against position, mean and range over seeds.

    ``log_acc``: a logarithmic accuracy axis with a line at 2/n!, the accuracy of a model that knows
    only the sign of the running permutation (S_n's quotient by A_n), and chance (1/n!) apart.
    """
    experiments = [(label, runs) for label, runs in experiments if any(s5_group(n) for n in runs)]
    if not experiments:
        return
    fig, axes = plt.subplots(1, len(experiments), figsize=(7 * len(experiments), 4.2), squeeze=False)
    for ax, (label_dir, runs) in zip(axes[0], experiments):
        groups = defaultdict(list)
        for name, run in runs.items():
            if s5_group(name) and run["eval"]:
                groups[s5_group(name)].append(run)
        lengths = sorted({int(k) for g in groups.values() for r in g for k in r["eval"]})
        longest = str(lengths[-1])
        first = next(iter(groups.values()))[0]
        steps = first["summary"].get("steps", "?")
        trained = first["config"].get("data", {}).get("max_len", 18)  # the longest training length
        degree = first["config"].get("data", {}).get("degree", 5)  # the group S_degree, degree! elements
        group_name = f"S{degree}" + ("" if degree == 5 else " (not S5)")
        print(f"\n### {group_name} ({label_dir}): accuracy per evaluation length, {steps} steps (mean ± sd over seeds), "
              f"chance 1/{math.factorial(degree)}\n")
        print("| model | params | seeds | steps | " + " | ".join(f"acc @{L}" for L in lengths)
              + f" | positions 1-3 (len {longest}) | mean acc, positions {trained + 1}-{longest} |")
        print("|---|---|---|---|" + "---|" * len(lengths) + "---|---|")
        for (_, _, label), group in sorted(groups.items(), key=lambda item: item[0]):
            curves = [r["eval"][longest]["acc_by_position"] for r in group]
            mean = [statistics.mean(c[t] for c in curves) for t in range(len(curves[0]))]
            pos = list(range(1, len(mean) + 1))
            line, = ax.plot(pos, mean, label=f"{label} ({len(group)} seed{'s' if len(group) > 1 else ''})")
            ax.fill_between(pos, [min(c[t] for c in curves) for t in range(len(pos))],
                            [max(c[t] for c in curves) for t in range(len(pos))], color=line.get_color(), alpha=0.2)
            accs = [mean_sd([r["eval"][str(L)]["acc"] for r in group]) for L in lengths]
            beyond = f"{statistics.mean(mean[trained:]):.3f}" if len(mean) > trained else "–"
            run_steps = group[0]["summary"].get("steps", "?")  # a variant may have trained longer
            print(f"| {label} | {group[0]['params']}M | {len(group)} | {run_steps} | " + " | ".join(accs)
                  + f" | {', '.join(f'{a:.2f}' for a in mean[:3])} | {beyond} |")
        print_position_ranges(runs, trained, int(longest), degree)
        ax.axvline(trained, color="gray", ls="--", lw=1)
        ax.text(trained + 1, 0.95, f"longest training length ({trained})", fontsize=8, color="gray")
        # A Transformer-PSM's prefix at position 2^k + 1 is first a tree node over 2^k tokens (k Agg levels deep).
        level = 1
        while 2 ** level + 1 <= int(longest):
            if 2 ** level + 1 > trained:
                ax.axvline(2 ** level + 1, color="gray", ls=":", lw=0.8)
                ax.text(2 ** level + 2, 0.07, f"2^{level}+1", transform=ax.get_xaxis_transform(), fontsize=7, color="gray")
            level += 1
        chance = 1 / math.factorial(degree)
        ax.axhline(chance, color="gray", ls=":", lw=1)
        ax.text(*((trained + 1, chance * 0.75) if log_acc else (0.85 * int(longest), chance + 0.015)),
                f"chance 1/{math.factorial(degree)}", fontsize=8, color="gray")
        if log_acc:
            ax.axhline(2 * chance, color="gray", ls="-.", lw=1)
            ax.text(0.6 * int(longest), 2 * chance * 1.15, f"sign of the permutation only, 2/{math.factorial(degree)}",
                    fontsize=8, color="gray")
        ax.set(xlabel="position (prefix length)", ylabel=f"accuracy at that position (eval length {longest})",
               yscale="log" if log_acc else "linear", ylim=(chance / 2, 1.3) if log_acc else (0, 1.02),
               title=f"{group_name} state tracking, {steps} steps ({label_dir})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.48, 0.42))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")


def position_ranges(trained: int, longest: int) -> list[tuple[int, int]]:
    """Inclusive 1-based position ranges: 3..trained, then doubling lengths up to ``longest``."""
    ranges, lo, hi = [(3, min(trained, longest))] if min(trained, longest) >= 3 else [], trained + 1, 2 * trained
    while lo <= longest:
        ranges.append((lo, min(hi, longest)))
        lo, hi = hi + 1, 2 * hi
    return ranges


def print_position_ranges(runs: dict, trained: int, longest: int, degree: int) -> None:
    """Per run: the loss at the longest training length and the mean accuracy over position ranges, beside the
    levels of a model exact at positions 1-2 that knows after them only the running permutation's sign (S_n / A_n),
    or nothing."""
    order = sorted((s5_group(name), name) for name, run in runs.items() if s5_group(name) and run["eval"])
    ranges = position_ranges(trained, longest)
    size, later = math.factorial(degree), (trained - 2) / trained
    print(f"\nPer run: loss at length {trained} and mean accuracy over positions (evaluation length {longest}). "
          f"Exact at positions 1-2, then only the sign: loss {later * math.log(size / 2):.3f}, accuracy "
          f"{2 / trained + later * 2 / size:.4f} at length {trained}, {2 / size:.4f} per position; then nothing: "
          f"loss {later * math.log(size):.3f}, {1 / size:.4f} per position.\n")
    print(f"| run | loss @{trained} | " + " | ".join(f"acc {lo}-{hi}" for lo, hi in ranges) + " |")
    print("|---|---|" + "---|" * len(ranges))
    for _, name in order:
        ev = runs[name]["eval"]
        acc = ev[str(longest)]["acc_by_position"]
        loss = f"{ev[str(trained)]['loss']:.3f}" if str(trained) in ev else "–"
        print(f"| {name} | {loss} | " + " | ".join(f"{statistics.mean(acc[lo - 1 : hi]):.4f}" for lo, hi in ranges) + " |")
    signed = [name for _, name in order if "group_acc_by_position" in runs[name]["eval"][str(longest)]]
    if signed:  # runs evaluated since the evaluation scores the sign itself
        print("\nSign accuracy (the predicted permutation's sign is the target's; chance 0.5) over the same positions:\n")
        print("| run | " + " | ".join(f"sign acc {lo}-{hi}" for lo, hi in ranges) + " |")
        print("|---|" + "---|" * len(ranges))
        for name in signed:
            sign = runs[name]["eval"][str(longest)]["group_acc_by_position"]
            print(f"| {name} | " + " | ".join(f"{statistics.mean(sign[lo - 1 : hi]):.3f}" for lo, hi in ranges) + " |")


def last_logged_eval(run: dict, length: int) -> tuple[float, int] | None:
    """(accuracy, step) of the last evaluation at ``length`` in the run's metrics.jsonl, if any."""
    key = f"eval/len{length}/acc"
    return next(((rec[key], rec["step"]) for rec in reversed(run["metrics"]) if key in rec), None)


def mqar_label(key: str, config: dict) -> tuple[int, str] | None:
    """(model order, label) of the MQAR run named mqar_<key>_L<length>: the model's name, then what its
    config.yaml sets apart (a transformer's depth, a seed other than 0, a forced precision)."""
    bases = [k for k in MQAR_NAMES if key.startswith(k)]
    if not bases:
        return None
    base = max(bases, key=len)
    model, train = config.get("model", {}), config.get("train", {})
    extras = []
    if base == "transformer" and model.get("n_layers"):
        extras.append(f"{model.get('n_layers')} blocks")
    if train.get("seed"):
        extras.append(f"seed {train['seed']}")
    if train.get("precision", "auto") != "auto":
        extras.append(train["precision"])
    return list(MQAR_NAMES).index(base), MQAR_NAMES[base] + (f" ({', '.join(extras)})" if extras else "")


def mqar(experiments: list[tuple[str, dict]], png: Path) -> None:
    rows = []  # (experiment, label, {L: acc}, params, steps, {L: step of a killed run's last evaluation})
    for label_dir, runs in experiments:
        table, params, steps, cut, order = defaultdict(dict), {}, {}, defaultdict(dict), {}
        for name, run in runs.items():
            m = re.fullmatch(r"mqar_(.+)_L(\d+)", name)
            found = mqar_label(m.group(1), run["config"]) if m else None
            if not found:
                continue
            (order_index, key), L = found, int(m.group(2))
            order[key] = order_index
            steps.setdefault(key, run["summary"].get("steps", "?"))
            if run["eval"]:
                table[key][L] = run["eval"][str(L)]["acc"]
                params[key] = run["params"]
            elif last := last_logged_eval(run, L):  # stopped before its final evaluation (killed)
                table[key][L], cut[key][L] = last
                params.setdefault(key, run["params"])
            else:
                table[key].setdefault(L, None)  # ran, no result (e.g. out of memory)
        for key in sorted(table, key=lambda k: (order[k], k)):
            rows.append((label_dir, key, table[key], params.get(key), steps[key], cut[key]))
    if not rows:
        return
    lengths = sorted({L for r in rows for L in r[2]})
    print("\n### MQAR: query accuracy at the training length (vocab 8192, 8 pairs)\n")
    print("| model | params | steps | results dir | " + " | ".join(f"L={L}" for L in lengths) + " |")
    print("|---|---|---|---|" + "---|" * len(lengths))
    # The plot has one curve per model and step count, over all results dirs: a later dir's value for a
    # length replaces an earlier one, except that a killed run's last evaluation never replaces a final one.
    curves: dict[tuple[str, object], dict[int, tuple[float, bool]]] = {}
    for label_dir, key, row, par, steps, cut in rows:
        cells = [
            "–" if L not in row
            else "failed" if row[L] is None
            else f"{row[L]:.3f} (killed; last evaluation, step {cut[L]})" if L in cut
            else f"{row[L]:.3f}"
            for L in lengths
        ]
        print(f"| {key} | {par}M | {steps} | {label_dir} | " + " | ".join(cells) + " |")
        curve = curves.setdefault((key, steps), {})
        for L, acc in row.items():
            if acc is not None and not (L in cut and L in curve and not curve[L][1]):
                curve[L] = (acc, L in cut)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, ((key, steps), curve) in enumerate(curves.items()):
        pts = sorted(curve.items())
        ax.plot([L for L, _ in pts], [a for _, (a, _) in pts], marker="o" if len(pts) > 1 else "*",
                ms=6 if len(pts) > 1 else 12, ls="-" if len(pts) > 1 else "none", color=f"C{i}", label=f"{key}, {steps} steps")
        killed = [(L, a) for L, (a, k) in pts if k]
        if killed:  # a killed run's last evaluation: hollow, larger marker
            ax.plot([L for L, _ in killed], [a for _, a in killed], ls="none", marker="o", ms=11, mfc="none", color=f"C{i}")
    if any(k for curve in curves.values() for _, k in curve.values()):
        ax.plot([], [], ls="none", marker="o", ms=11, mfc="none", color="gray", label="killed: last evaluation")
    ax.set(xscale="log", xlabel="sequence length (train = eval)", ylabel="query accuracy", ylim=(0, 1.02),
           title="MQAR, 8 key-value pairs, vocab 8192")
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xticks([], minor=True)  # a log axis under one decade labels its minor ticks over the lengths
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")


DISTANCE_LABELS = {"same": "same chunk", "1": "1 chunk back", ">=2": "≥ 2 chunks back"}


def mqar_distance(runs: dict, png: Path) -> None:
    """Per run with acc_by_distance in its eval.json (MQAR): accuracy overall and by the chunk distance between
    each query and its key, at the training length; a grouped bar chart."""
    rows = []
    for name, run in sorted(runs.items()):
        data = run["config"].get("data", {})
        length = str(data.get("seq_len", ""))
        res = (run["eval"] or {}).get(length, {})
        if "acc_by_distance" in res:
            rows.append((name, data, res))
    if not rows:
        return
    chunk = {d.get("distance_chunk") for _, d, _ in rows}
    print(f"\n### MQAR: query accuracy by chunk distance to the key (chunks of {', '.join(map(str, chunk))} tokens)\n")
    print("| run | placement | filler | accuracy | " + " | ".join(DISTANCE_LABELS.values()) + " |")
    print("|---|---|---|---|" + "---|" * len(DISTANCE_LABELS))
    for name, data, res in rows:
        cells = [f"{a:.3f} ({res['scored_by_distance'][k]})" if (a := res["acc_by_distance"][k]) is not None else "–"
                 for k in DISTANCE_LABELS]
        print(f"| {name} | {data.get('query_placement', 'power_law')} | {data.get('filler', 'zero')} | {res['acc']:.3f} | "
              + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows)), 4))
    width = 0.8 / len(DISTANCE_LABELS)
    for j, (key, label) in enumerate(DISTANCE_LABELS.items()):
        ax.bar([i + (j - 1) * width for i in range(len(rows))],
               [res["acc_by_distance"][key] or 0.0 for _, _, res in rows], width, label=label, color=f"C{j}")
    ax.set_xticks(range(len(rows)), [name.replace(",", "\n") for name, _, _ in rows], fontsize=7)
    ax.set(ylabel="query accuracy", ylim=(0, 1.02), title="MQAR accuracy by the distance from query to key")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")


def lm(runs: dict, png: Path) -> None:
    chosen = {}
    for name, run in runs.items():
        m = re.fullmatch(r"lm_(.+)", name)
        if m and run["metrics"]:
            chosen[m.group(1)] = run
    if not chosen:
        return
    fig, (ax_v, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    print("\n### LM: validation perplexity (python-stdlib shards, BPE 8192, 512-token sequences)\n")
    print("| model | params | steps | tokens | val loss | val ppl | val next-token acc | wall s (incl. start, 5-8 evals) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in [k for k in LM_NAMES if k in chosen] + [k for k in chosen if k not in LM_NAMES]:
        run = chosen[key]
        label = LM_NAMES.get(key, key)
        ev = [(r["step"], r[k]) for r in run["metrics"] for k in r if k.startswith("eval/") and k.endswith("/loss")]
        if ev:
            ax_v.plot([s for s, _ in ev], [math.exp(v) for _, v in ev], marker="o", ms=3, label=label)
        tr = [(r["step"], r["loss"]) for r in run["metrics"] if "loss" in r]
        ax_t.plot([s for s, _ in tr], [v for _, v in tr], lw=1, label=label)
        if run["eval"]:
            (length, res), = list(run["eval"].items())[:1]
            steps = run["summary"].get("steps", "?")
            tokens = steps * int(length) * run["config"]["train"]["batch_size"]
            print(f"| {label} | {run['params']}M | {steps} | {tokens / 1e6:.1f}M | {res['loss']:.3f} | {res['ppl']:.2f} | "
                  f"{res['acc']:.3f} | {run['summary'].get('wall_s', 0):.0f} |")
    ax_v.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    ax_t.set(xlabel="step", ylabel="training loss", title="training loss")
    for ax in (ax_v, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")


def generation(paths: list[Path], png: Path) -> None:
    """Points from several bench_generation.py files; for a (model, batch, context) the first file wins."""
    rows, seen, meta = [], set(), None
    for path in paths:
        data = json.loads(path.read_text())
        meta = meta or data["meta"]
        for r in data["rows"]:
            key = (r["model"], r["batch"], r["context"])
            if "ms_per_token" in r and key not in seen:
                seen.add(key)
                rows.append(r)
    data = {"meta": meta}
    if not rows:
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    series = defaultdict(list)
    for r in rows:
        name = r["model"] + (f" c={r['chunk']}" if "chunk" in r else "")
        series[(name, r["batch"])].append(r)
    names = sorted({name for name, _ in series})
    color = {name: f"C{i}" for i, name in enumerate(names)}
    for (name, batch), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["context"])
        ax = axes[batches.index(batch)]
        ctx = [r["context"] for r in rs]
        ax.plot(ctx, [r["ms_per_token"] for r in rs], marker="o", color=color[name], label=f"{name} (mean)")
        if "c=" in name:
            ax.plot(ctx, [r["ms_max"] for r in rs], ls=":", marker=".", color=color[name], label=f"{name} (worst token)")
        axes[-1].plot(ctx, [max(r["state_bytes"], 1) / 2**20 for r in rs], marker="o" if batch == batches[0] else "s",
                      ls="-" if batch == batches[0] else "--", color=color[name], label=f"{name}, batch {batch}")
    for ax, batch in zip(axes, batches):
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per generated token",
               title=f"per-token latency, batch {batch}")
    axes[-1].set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="state MiB", title="generation state memory")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"generation on {data['meta']['device']}, bf16, d 768 models", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", type=Path, default=[],
                    help="sweep output dirs (or of the former tools/bench_results.py); each is one experiment "
                         "(one S5 panel, one set of MQAR rows)")
    ap.add_argument("--generation", nargs="*", type=Path, default=[],
                    help="JSONs of tools/bench_generation.py (for a point measured in several, the first file wins)")
    ap.add_argument("--out-dir", type=Path, default=Path("docs"))
    ap.add_argument("--tag", default="", help="appended to the figure names: results_s5TAG.png, ...")
    ap.add_argument("--log-acc", action="store_true",
                    help="S5: logarithmic accuracy axis, with the accuracy of knowing only the permutation's sign")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    experiments = [(d.name, load_runs([d])) for d in args.runs]
    png = {kind: args.out_dir / f"results_{kind}{args.tag}.png"
           for kind in ("s5", "mqar", "mqar_distance", "lm", "generation")}
    s5(experiments, png["s5"], args.log_acc)
    mqar(experiments, png["mqar"])
    mqar_distance({name: run for _, runs in experiments for name, run in runs.items()}, png["mqar_distance"])
    lm({name: run for _, runs in experiments for name, run in runs.items()}, png["lm"])
    if args.generation:
        generation(args.generation, png["generation"])


if __name__ == "__main__":
    main()
