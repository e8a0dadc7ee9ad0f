"""Scaling laws: fit L(N, D) = E + A/N^alpha + B/D^beta per model family on a CSV of (N, D, loss) rows,
the compute-optimal frontier, and plots.

The CSV is what ``psm-train sweep collect`` writes (psm_train/launch/collect.py): one row per (N, D)
point with member, family, N (parameters including embeddings), N_non_embedding, D (training tokens),
C = 6ND, the loss, the metric's name and the member's swept values.

The fit is least squares on log-space residuals with a Huber loss (robust to a diverged or unlucky
member), bounded parameters, a grid of starts keeping the best, and bootstrap over rows for the
uncertainty. With C = 6ND the loss is lowest at N_opt = G (C/6)^a, D_opt = (C/6)^b / G, where
a = beta/(alpha+beta), b = 1 - a and G = (alpha A / (beta B))^(1/(alpha+beta)) -- the compute-optimal
frontier.

scipy and matplotlib are optional dependencies (``pip install 'psm-train[analysis]'``), imported where
they are used.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ["member", "family", "N", "D", "C", "loss", "metric"]  # collect writes these first, then its own
PARAMS = ("E", "A", "B", "alpha", "beta")
# Optimised as (log E, log A, log B, alpha, beta): A and B span many orders of magnitude.
LOWER = np.array([-20.0, -20.0, -20.0, 0.01, 0.01])
UPPER = np.array([10.0, 100.0, 100.0, 2.0, 2.0])
HUBER_DELTA = 1e-3  # as in Hoffmann et al. (2022): residuals above this count linearly
MIN_POINTS, MIN_DISTINCT = 5, 2


class ScalingError(ValueError):
    """Input that cannot be collected or fitted; the message names the file and the field."""


# ---------------------------------------------------------------- CSV


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in COLUMNS]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path, n_column: str = "N") -> list[dict[str, Any]]:
    """Rows with N, D and loss as floats (C is recomputed as 6ND); errors name the line and the column.
    ``n_column`` is the column read as N: N (all parameters) or N_non_embedding."""
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"{path}: no such file")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("family", n_column, "D", "loss") if rows and c not in rows[0]]
    if not rows or missing:
        raise ScalingError(f"{path}: " + (f"column {missing[0]!r} missing" if rows else "no rows"))
    for line, row in enumerate(rows, start=2):
        for col in (n_column, "D", "loss"):
            try:
                row[col] = float(row[col])
            except (TypeError, ValueError):
                raise ScalingError(f"{path}, line {line}: column {col!r}: expected a number, got {row[col]!r}") from None
        row["N"] = row[n_column]
    return rows


# ---------------------------------------------------------------- fit


@dataclass
class FamilyFit:
    family: str
    points: int
    params: dict[str, float] = field(default_factory=dict)  # E, A, B, alpha, beta
    std: dict[str, float] = field(default_factory=dict)  # E, log_A, log_B, alpha, beta, a: robust_std over resamples
    boots: int = 0  # bootstrap resamples that could be fitted
    at_bounds: list[str] = field(default_factory=list)  # E also when below 0.1% of the lowest loss
    skipped: str = ""  # why there is no fit
    rms_log_residual: float = 0.0  # of the fit on all points: how well five parameters describe them

    @property
    def a(self) -> float:
        """N_opt grows as C^a; D_opt as C^(1-a)."""
        return self.params["beta"] / (self.params["alpha"] + self.params["beta"])


def log_predict(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L(N, D) as a log-sum-exp, which stays finite for any A, B and exponents."""
    e, a, b, alpha, beta = theta
    return np.logaddexp(np.logaddexp(e, a - alpha * log_n), b - beta * log_d)


def _residuals(theta, log_n, log_d, log_l):
    return log_predict(theta, log_n, log_d) - log_l


def _jacobian(theta, log_n, log_d, log_l):
    """d log L / d theta: each term's share of L (a softmax) times its inner derivative."""
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d], axis=1)
    w = np.exp(terms - terms.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.stack([w[:, 0], w[:, 1], w[:, 2], -w[:, 1] * log_n, -w[:, 2] * log_d], axis=1)


def _starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> list[np.ndarray]:
    """A grid over E and the exponents; A and B chosen so each term starts near the observed scale."""
    low, mean = float(np.exp(log_l.min())), float(np.exp(log_l).mean())
    starts = []
    for e_frac, alpha, beta in itertools.product((0.2, 0.6, 0.9), (0.2, 0.5, 1.0), (0.2, 0.5, 1.0)):
        e = e_frac * low
        half = math.log(max(mean - e, 1e-6) / 2)
        theta = np.array([math.log(e), half + alpha * log_n.mean(), half + beta * log_d.mean(), alpha, beta])
        starts.append(np.clip(theta, LOWER, UPPER))
    return starts


def _solve(log_n, log_d, log_l, starts: list[np.ndarray]) -> np.ndarray:
    from scipy.optimize import least_squares

    best = None
    for x0 in starts:
        res = least_squares(_residuals, x0, jac=_jacobian, bounds=(LOWER, UPPER), loss="huber", f_scale=HUBER_DELTA,
                            args=(log_n, log_d, log_l))
        if best is None or res.cost < best.cost:
            best = res
    return best.x


def shortfall(n: np.ndarray, d: np.ndarray) -> str:
    """Why these points cannot determine the five parameters ('' when they can)."""
    missing = []
    if len(n) < MIN_POINTS:
        missing.append(f"{len(n)} points (need >= {MIN_POINTS})")
    for name, values in (("N", n), ("D", d)):
        if len(set(values)) < MIN_DISTINCT:
            missing.append(f"{len(set(values))} distinct {name} (need >= {MIN_DISTINCT})")
    return ", ".join(missing)


def fit_family(family: str, n: np.ndarray, d: np.ndarray, loss: np.ndarray, boots: int = 200,
               seed: int = 0) -> FamilyFit:
    """Best of the start grid on all points; bootstrap refits (from the best) give the std."""
    why = shortfall(n, d)
    if why:
        return FamilyFit(family, len(n), skipped=why)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta = _solve(log_n, log_d, log_l, _starts(log_n, log_d, log_l))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(20 * boots):  # resamples that lose too many distinct points are drawn again
        if len(samples) == boots:
            break
        idx = rng.integers(0, len(n), len(n))
        if len(set(idx)) >= MIN_POINTS and not shortfall(n[idx], d[idx]):
            samples.append(_solve(log_n[idx], log_d[idx], log_l[idx], [theta]))
    rms = float(np.sqrt(np.mean((log_predict(theta, log_n, log_d) - log_l) ** 2)))
    out = FamilyFit(family, len(n), params=_natural(theta), boots=len(samples), rms_log_residual=rms)
    # E's bound is far below any loss, and a fit that resolves no floor drifts towards it slowly
    out.at_bounds = [name for name, v, lo, hi in zip(PARAMS, theta, LOWER, UPPER)
                     if np.isclose(v, lo, atol=1e-3) or np.isclose(v, hi, atol=1e-3)
                     or (name == "E" and math.exp(v) < 1e-3 * loss.min())]
    if len(samples) >= 2:
        s = np.array(samples)
        spread = {"E": np.exp(s[:, 0]), "log_A": s[:, 1], "log_B": s[:, 2], "alpha": s[:, 3], "beta": s[:, 4],
                  "a": s[:, 4] / (s[:, 3] + s[:, 4])}
        out.std = {k: robust_std(v) for k, v in spread.items()}
    return out


def robust_std(values: np.ndarray) -> float:
    """Half the central 68% interval: the std for normal spread, but not blown up by the odd
    resample that lost most of its N or D values and ran to a bound."""
    lo, hi = np.percentile(values, [15.87, 84.13])
    return float(hi - lo) / 2


def _natural(theta: np.ndarray) -> dict[str, float]:
    e, a, b, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _theta(p: dict[str, float]) -> np.ndarray:
    return np.array([math.log(p["E"]), math.log(p["A"]), math.log(p["B"]), p["alpha"], p["beta"]])


def predict(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.exp(log_predict(_theta(p), np.log(n), np.log(d)))


def frontier(p: dict[str, float], c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N_opt, D_opt, L_opt) at compute C = 6ND, in closed form (in logs: A and B may be huge)."""
    alpha, beta = p["alpha"], p["beta"]
    log_g = (math.log(alpha) + math.log(p["A"]) - math.log(beta) - math.log(p["B"])) / (alpha + beta)
    log_n = log_g + beta / (alpha + beta) * np.log(np.asarray(c) / 6)
    n = np.exp(log_n)
    d = np.asarray(c) / (6 * n)
    return n, d, predict(p, n, d)


def within_data(f: FamilyFit, rows: list[dict[str, Any]], c: np.ndarray) -> np.ndarray:
    """Per C: whether the family's compute-optimal (N, D) lies inside the N and D its points span (else the
    frontier there is an extrapolation of the fit)."""
    n_obs = [r["N"] for r in rows if r["family"] == f.family]
    d_obs = [r["D"] for r in rows if r["family"] == f.family]
    n, d, _ = frontier(f.params, c)
    tol = 1 + 1e-9
    return ((n * tol >= min(n_obs)) & (n <= max(n_obs) * tol) & (d * tol >= min(d_obs)) & (d <= max(d_obs) * tol))


def compute_grid(c: np.ndarray) -> np.ndarray:
    """One C per decade from the smallest observed to a hundred times the largest."""
    lo, hi = math.floor(math.log10(c.min())), math.ceil(math.log10(c.max())) + 2
    return 10.0 ** np.arange(lo, hi + 1)


# ---------------------------------------------------------------- report and plots


def _by_family(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["family"], []).append(r)
    return out


def _usable(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows a log-space fit can use, and the members dropped (a NaN or non-positive value)."""
    keep, dropped = [], []
    for r in rows:
        ok = all(math.isfinite(r[k]) and r[k] > 0 for k in ("N", "D", "loss"))
        (keep if ok else dropped).append(r)
    return keep, [f"{r.get('member', '?')}: N={r['N']}, D={r['D']}, loss={r['loss']}" for r in dropped]


def fit_rows(rows: list[dict[str, Any]], boots: int = 200, seed: int = 0) -> list[FamilyFit]:
    fits = []
    for family, fam_rows in _by_family(rows).items():
        arr = {k: np.array([r[k] for r in fam_rows], dtype=float) for k in ("N", "D", "loss")}
        fits.append(fit_family(family, arr["N"], arr["D"], arr["loss"], boots, seed))
    return fits


def _pm(value: float, std: float | None, fmt: str = ".3f") -> str:
    return f"{value:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")


def format_report(fits: list[FamilyFit], rows: list[dict[str, Any]], reference: str = "transformer") -> str:
    """The parameter table across families, each fitted family's compute-optimal frontier, and the others'
    frontier loss over the reference family's."""
    width = max(len("family"), *(len(f.family) for f in fits))
    lines = ["L(N, D) = E + A/N^alpha + B/D^beta; ± is the bootstrap std (robust); N_opt ∝ C^a; "
             "rms: root-mean-square log residual of the fit",
             f"{'family':<{width}} {'pts':>4} {'E':>15} {'alpha':>15} {'beta':>15} {'log A':>15} "
             f"{'log B':>15} {'a':>15} {'rms':>7}"]
    for f in fits:
        if f.skipped:
            lines.append(f"{f.family:<{width}} {f.points:>4}  not fitted: {f.skipped}")
            continue
        s, p = f.std, f.params
        cells = [_pm(p["E"], s.get("E")), _pm(p["alpha"], s.get("alpha")), _pm(p["beta"], s.get("beta")),
                 _pm(math.log(p["A"]), s.get("log_A"), ".2f"), _pm(math.log(p["B"]), s.get("log_B"), ".2f"),
                 _pm(f.a, s.get("a"))]
        lines.append(f"{f.family:<{width}} {f.points:>4} " + " ".join(f"{c:>15}" for c in cells)
                     + f" {f.rms_log_residual:>7.4f}" + (f"  (at bound: {', '.join(f.at_bounds)})" if f.at_bounds else ""))
    grid = compute_grid(np.array([r["N"] * r["D"] * 6 for r in rows]))
    for f in fits:
        if f.skipped:
            continue
        n, d, loss = frontier(f.params, grid)
        inside = within_data(f, rows, grid)
        lines += ["", f"compute-optimal frontier, {f.family} ({f.boots} bootstrap fits; in data: N_opt and D_opt "
                      "within the N and D of its points):",
                  f"{'C':>10} {'N_opt':>10} {'D_opt':>10} {'D/N':>8} {'loss':>8} {'in data':>8}"]
        lines += [f"{c:>10.2e} {nn:>10.3g} {dd:>10.3g} {dd / nn:>8.3g} {ll:>8.4f} {'yes' if ok else 'no':>8}"
                  for c, nn, dd, ll, ok in zip(grid, n, d, loss, inside)]
    ratios = frontier_ratios(fits, grid, reference)
    if ratios:
        fitted = {f.family: f for f in fits if not f.skipped}
        ref_inside = within_data(fitted[reference], rows, grid)
        marks = {fam: ~(within_data(fitted[fam], rows, grid) & ref_inside) for fam in ratios}
        lines += ["", f"frontier loss over {reference}'s at equal compute (*: either frontier outside its data):",
                  f"{'C':>10} " + " ".join(f"{fam:>16}" for fam in ratios)]
        lines += [f"{c:>10.2e} " + " ".join(f"{ratios[fam][i]:>15.4f}{'*' if marks[fam][i] else ' '}" for fam in ratios)
                  for i, c in enumerate(grid)]
    return "\n".join(lines)


def frontier_ratios(fits: list[FamilyFit], c: np.ndarray, reference: str) -> dict[str, np.ndarray]:
    """family -> its compute-optimal loss over the reference family's at each C ({} without a fitted reference)."""
    fitted = {f.family: f for f in fits if not f.skipped}
    if reference not in fitted:
        return {}
    ref = frontier(fitted[reference].params, c)[2]
    return {fam: frontier(f.params, c)[2] / ref for fam, f in fitted.items() if fam != reference}


def _colors(families: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {fam: cmap(i % 10) for i, fam in enumerate(families)}


def plot_loss_vs_compute(fits: list[FamilyFit], rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Observed losses per family against C = 6ND, with each fit's loss along its frontier."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    groups = _by_family(rows)
    colors = _colors(list(groups))
    c_all = np.array([6 * r["N"] * r["D"] for r in rows])
    c_line = np.geomspace(c_all.min() / 2, c_all.max() * 10, 100)
    fitted = {f.family: f for f in fits if not f.skipped}
    for family, fam_rows in groups.items():
        ax.scatter([6 * r["N"] * r["D"] for r in fam_rows], [r["loss"] for r in fam_rows], color=colors[family],
                   label=family if family not in fitted else None, s=25)
        if family in fitted:
            f = fitted[family]
            loss, inside = frontier(f.params, c_line)[2], within_data(f, rows, c_line)
            ax.plot(c_line, np.where(inside, loss, np.nan), color=colors[family],
                    label=f"{family}: E={f.params['E']:.3g}, α={f.params['alpha']:.2f}, β={f.params['beta']:.2f}")
            ax.plot(c_line, np.where(inside, np.nan, loss), color=colors[family], linestyle="--")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=metric,
           title="loss vs compute; lines: fitted loss on the compute-optimal frontier\n"
                 "(dashed where its N_opt or D_opt lies outside the family's points)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_isoflop(fits: list[FamilyFit], rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Per fitted family: fitted loss vs N at a few fixed C, with the observed points nearest each C."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fitted = [f for f in fits if not f.skipped]
    cols = min(3, len(fitted))
    rows_n = math.ceil(len(fitted) / cols)
    fig = Figure(figsize=(5 * cols, 4 * rows_n), layout="constrained")
    groups = _by_family(rows)
    for i, f in enumerate(fitted):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        pts = groups[f.family]
        n_obs, c_obs = np.array([r["N"] for r in pts]), np.array([6 * r["N"] * r["D"] for r in pts])
        l_obs = np.array([r["loss"] for r in pts])
        levels = np.geomspace(c_obs.min(), c_obs.max(), 4) if c_obs.max() > c_obs.min() else c_obs[:1]
        nearest = np.abs(np.log(c_obs)[:, None] - np.log(levels)[None, :]).argmin(axis=1)
        n_line = np.geomspace(n_obs.min() / 4, n_obs.max() * 4, 100)
        l_opt = frontier(f.params, levels)[2]
        for j, c in enumerate(levels):
            color = colormaps["viridis"](j / max(len(levels) - 1, 1))
            ax.plot(n_line, predict(f.params, n_line, c / (6 * n_line)), color=color, label=f"C={c:.2g}")
            ax.plot(frontier(f.params, np.array([c]))[0], l_opt[j], marker="*", markersize=10, color=color)
            ax.scatter(n_obs[nearest == j], l_obs[nearest == j], color=color, edgecolor="k", s=25)
        # the curves climb steeply away from the optimum: keep the observed range in view
        ax.set_ylim(0.8 * min(l_obs.min(), l_opt.min()), 1.5 * l_obs.max())
        ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel=metric,
               title=f"{f.family}: iso-FLOP curves (stars: N_opt)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def plot_ratio(fits: list[FamilyFit], rows: list[dict[str, Any]], path: Path, metric: str, reference: str) -> None:
    """Each family's fitted compute-optimal loss over the reference family's, against C: solid where both
    frontiers lie within their families' data, dashed where either is an extrapolation."""
    from matplotlib.figure import Figure

    c_obs = np.array([6 * r["N"] * r["D"] for r in rows])
    c = np.geomspace(c_obs.min(), c_obs.max() * 100, 200)
    colors = _colors(list(_by_family(rows)))
    fitted = {f.family: f for f in fits if not f.skipped}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ref_inside = within_data(fitted[reference], rows, c)
    for fam, ratio in frontier_ratios(fits, c, reference).items():
        inside = within_data(fitted[fam], rows, c) & ref_inside
        ax.plot(c, np.where(inside, ratio, np.nan), color=colors[fam], label=fam)
        ax.plot(c, np.where(inside, np.nan, ratio), color=colors[fam], linestyle="--")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=f"{metric} / {reference}'s",
           title=f"compute-optimal loss relative to the {reference}\n(dashed: a frontier outside its family's data)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def fit_csv(csv_path: str | Path, out_dir: str | Path, boots: int = 200, seed: int = 0,
            n_column: str = "N", reference: str = "transformer") -> dict[str, Any]:
    """Fit every family of a collected CSV (N read from ``n_column``); print the report, write fit.json and the
    PNG plots."""
    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as e:
        raise ScalingError(f"fitting needs scipy and matplotlib ({e}): pip install 'psm-train[analysis]'") from None
    rows = read_csv(csv_path, n_column)
    names = sorted({r.get("metric") or "loss" for r in rows})
    if len(names) > 1:
        raise ScalingError(f"{csv_path}: rows of several metrics ({', '.join(names)}); fit one at a time")
    rows, dropped = _usable(rows)
    for why in dropped:
        print(f"dropped {why}")
    if not rows:
        raise ScalingError(f"{csv_path}: no row with a positive, finite N, D and loss")
    fits = fit_rows(rows, boots, seed)
    print(f"{csv_path}: {len(rows)} rows, metric {names[0]}, N = {n_column}")
    print(format_report(fits, rows, reference))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [out_dir / "loss_vs_compute.png"]
    plot_loss_vs_compute(fits, rows, plots[0], names[0])
    if any(not f.skipped for f in fits):
        plots.append(out_dir / "isoflop.png")
        plot_isoflop(fits, rows, plots[1], names[0])
    if frontier_ratios(fits, compute_grid(np.array([6 * r["N"] * r["D"] for r in rows])), reference):
        plots.append(out_dir / f"ratio_to_{reference}.png")
        plot_ratio(fits, rows, plots[-1], names[0], reference)
    else:
        print("no family could be fitted: no iso-FLOP plot")
    result = {"csv": str(csv_path), "metric": names[0], "N": n_column, "reference": reference,
              "families": {f.family: _fit_json(f, rows, fits, reference) for f in fits}, "plots": [str(p) for p in plots]}
    (out_dir / "fit.json").write_text(json.dumps(result, indent=1))
    print("wrote " + ", ".join(str(p) for p in [out_dir / "fit.json", *plots]))
    return result


def _fit_json(f: FamilyFit, rows: list[dict[str, Any]], fits: list[FamilyFit], reference: str) -> dict[str, Any]:
    if f.skipped:
        return {"points": f.points, "skipped": f.skipped}
    grid = compute_grid(np.array([6 * r["N"] * r["D"] for r in rows]))
    n, d, loss = frontier(f.params, grid)
    ratio = frontier_ratios(fits, grid, reference).get(f.family)
    inside = within_data(f, rows, grid)
    return {"points": f.points, "params": f.params, "std": f.std, "bootstrap_fits": f.boots,
            "at_bounds": f.at_bounds, "rms_log_residual": f.rms_log_residual, "a": f.a, "b": 1 - f.a,
            "frontier": [{"C": float(c), "N_opt": float(nn), "D_opt": float(dd), "loss": float(ll),
                          "within_data": bool(inside[i]),
                          **({f"loss_over_{reference}": float(ratio[i])} if ratio is not None else {})}
                         for i, (c, nn, dd, ll) in enumerate(zip(grid, n, d, loss))]}
