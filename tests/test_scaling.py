"""Scaling laws over sweeps: collect from run directories shaped as the trainer leaves them, the
fit on synthetic losses of known parameters, the frontier, plots and the CLI end to end."""

import csv
import json
import math
import os
import textwrap

import numpy as np
import pytest

from psm_train.cli import main
from psm_train.analysis.scaling import (FamilyFit, ScalingError, fit_family, frontier, frontier_ratios, predict,
                                        within_data, write_csv)
from psm_train.launch.collect import collect, default_metric
from psm_train.launch.sweep import load_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. (2022)


def _grid(noise: float = 0.005, seed: int = 1):
    n = np.repeat([1e7, 3e7, 1e8, 3e8, 1e9], 4)
    d = np.tile([1e9, 3e9, 1e10, 1e11], 5)
    loss = predict(TRUE, n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, loss


def _close(fit):
    p = fit.params
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.05 and abs(p["beta"] - TRUE["beta"]) < 0.05, p
    assert abs(p["E"] / TRUE["E"] - 1) < 0.05, p


def test_fit_recovers_known_parameters_and_ignores_an_outlier():
    n, d, loss = _grid()
    fit = fit_family("f", n, d, loss, boots=30, seed=0)
    _close(fit)
    assert fit.boots == 30 and 0 < fit.std["alpha"] < 0.05 and not fit.at_bounds
    loss[3] *= 1.5  # one diverged member
    _close(fit_family("f", n, d, loss, boots=0))


def test_fit_quality_and_frontier_ratio_to_a_reference():
    n, d, loss = _grid(noise=0.0)
    assert fit_family("f", n, d, loss, boots=0).rms_log_residual < 1e-3  # exact data: the fit passes through it
    assert fit_family("f", n, d, loss * np.exp(np.random.default_rng(0).normal(0, 0.02, n.size)),
                      boots=0).rms_log_residual > 0.01
    worse = {**TRUE, "E": TRUE["E"] * 1.1}
    fits = [FamilyFit("transformer", 20, params=TRUE), FamilyFit("psm", 20, params=worse), FamilyFit("gla", 3, skipped="few")]
    c = np.array([1e20, 1e22])
    ratios = frontier_ratios(fits, c, "transformer")
    assert list(ratios) == ["psm"]  # the reference and unfitted families have none
    assert np.allclose(ratios["psm"], frontier(worse, c)[2] / frontier(TRUE, c)[2]) and (ratios["psm"] > 1).all()
    assert frontier_ratios(fits, c, "mamba2") == {}
    n_opt, d_opt, _ = frontier(TRUE, c)
    rows = [{"family": "transformer", "N": n, "D": d} for n, d in ((n_opt[0] / 2, d_opt[0]), (n_opt[0] * 2, d_opt[0] * 2))]
    assert within_data(fits[0], rows, c).tolist() == [True, False]  # the second C's optimum lies beyond the points


def test_too_few_points_say_what_is_missing():
    fit = fit_family("f", np.array([1e6, 1e6, 1e6]), np.array([1e8, 2e8, 3e8]), np.array([3.0, 2.9, 2.8]))
    assert not fit.params
    assert fit.skipped == "3 points (need >= 5), 1 distinct N (need >= 2)"


def test_frontier_is_the_minimum_at_fixed_compute():
    c = np.array([1e20, 1e22])
    n_opt, d_opt, l_opt = frontier(TRUE, c)
    assert np.allclose(6 * n_opt * d_opt, c)
    for ci, ni, li in zip(c, n_opt, l_opt):
        n = ni * np.array([0.5, 0.9, 1.1, 2.0])
        assert (predict(TRUE, n, ci / (6 * n)) > li).all()
    # N_opt grows as C^(beta / (alpha + beta))
    assert math.isclose(math.log(n_opt[1] / n_opt[0]) / math.log(100), 0.28 / 0.62, rel_tol=1e-9)


def _sweep(tmp_path):
    path = tmp_path / "scaling.yaml"
    path.write_text(textwrap.dedent(f"""\
        config: {REPO}/configs/mqar_tiny.yaml
        out_dir: {tmp_path}/out
        list:
          - {{model: {{name: transformer, n_layers: 1}}}}
          - {{model: {{name: gla, n_layers: 1, n_heads: 2}}}}
        grid:
          model.d_model: [32, 64, 96]
          train.steps: [100, 200]
        """))
    return path


def _finish(member, n_params: int, tokens: int, loss: float, summary: bool = True):
    """What the trainer leaves in a finished run directory (final.pt is only the marker here)."""
    run_dir = member.cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "final.pt"), "wb").close()
    if summary:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"name": member.cfg.name, "model": member.cfg.model.name, "n_params": n_params,
                       "n_params_non_embedding": n_params - 4096, "tokens": tokens, "steps": tokens // 2048,
                       "train_loss": loss * 0.9,
                       "eval": {"eval/len64/loss": loss * 1.5, "eval/len32/loss": loss, "eval/len32/acc": 0.5}}, f)


def _fake_runs(tmp_path):
    """Transformer: 6 finished members with losses from TRUE; gla: 2 finished, 1 without summary, 3 not run."""
    path = _sweep(tmp_path)
    members = load_sweep(path).members
    for m in members:
        n = 1e7 * m.cfg.model.config.d_model
        d = 1e7 * m.cfg.train.steps
        loss = float(predict(TRUE, np.array([n]), np.array([d]))[0])
        if m.cfg.model.name == "transformer" or m.cfg.model.config.d_model == 32:
            _finish(m, int(n), int(d), loss)
        elif m.cfg.model.config.d_model == 64 and m.cfg.train.steps == 100:
            _finish(m, int(n), int(d), loss, summary=False)
    return path


def test_collect_rows_unfinished_members_and_the_default_metric(tmp_path):
    got = collect(_fake_runs(tmp_path))
    assert got.metric == "eval/len32/loss"  # the shortest eval length, not the first in sort order (len64 < len32 as text)
    assert len(got.rows) == 8 and sorted({r["family"] for r in got.rows}) == ["gla", "transformer"]
    row = got.rows[0]
    assert row["member"] == "name=transformer,n_layers=1,d_model=32,steps=100"
    assert row["N"] == 320_000_000 and row["D"] == 1_000_000_000 and row["C"] == 6.0 * row["N"] * row["D"]
    assert row["model.name"] == "transformer" and row["model.d_model"] == 32 and row["train.steps"] == 100
    assert len(got.unfinished) == 4
    assert any("final.pt but no summary.json" in u for u in got.unfinished)
    assert collect(tmp_path / "scaling.yaml", "train_loss").rows[0]["loss"] == pytest.approx(row["loss"] * 0.9)
    with pytest.raises(ScalingError, match=r"summary.json: no metric 'eval/len128/loss' \(has: eval/len32/acc"):
        collect(tmp_path / "scaling.yaml", "eval/len128/loss")
    assert default_metric([{"train_loss": 1.0}]) == "train_loss"


def test_collect_names_the_file_of_a_bad_summary(tmp_path):
    member = load_sweep(_sweep(tmp_path)).members[0]
    _finish(member, 10, 10, 1.0)
    path = os.path.join(member.cfg.run_dir, "summary.json")
    with open(path, "w") as f:
        json.dump({"model": "transformer", "tokens": 10}, f)
    with pytest.raises(ScalingError, match=f"{path}: field 'n_params' missing"):
        collect(tmp_path / "scaling.yaml")


def test_cli_collect_then_fit(tmp_path, capsys):
    sweep = _fake_runs(tmp_path)
    out = tmp_path / "res" / "results.csv"
    main(["sweep", "collect", str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "4 unfinished (not in the CSV)" in printed and f"wrote 8 rows (eval/len32/loss) to {out}" in printed
    with open(out) as f:
        header = next(csv.reader(f))
    assert header[:7] == ["member", "family", "N", "D", "C", "loss", "metric"] and "train.steps" in header

    main(["sweep", "fit", str(out), "--out-dir", str(tmp_path / "plots"), "--bootstrap", "10"])
    printed = capsys.readouterr().out
    assert "gla" in printed and "not fitted: 2 points (need >= 5), 1 distinct N (need >= 2)" in printed
    assert "compute-optimal frontier, transformer" in printed
    result = json.loads((tmp_path / "plots" / "fit.json").read_text())
    fam = result["families"]["transformer"]
    assert abs(fam["params"]["alpha"] - TRUE["alpha"]) < 0.05 and fam["bootstrap_fits"] == 10
    assert result["families"]["gla"]["skipped"]
    for name in ("loss_vs_compute.png", "isoflop.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # N without the embeddings (the CSV's N_non_embedding column, from summary.json)
    assert "N_non_embedding" in header
    main(["sweep", "fit", str(out), "--out-dir", str(tmp_path / "plots_ne"), "--bootstrap", "0",
          "--n-column", "N_non_embedding"])
    assert "8 rows, metric eval/len32/loss, N = N_non_embedding" in capsys.readouterr().out
    result = json.loads((tmp_path / "plots_ne" / "fit.json").read_text())
    assert result["N"] == "N_non_embedding" and result["families"]["transformer"]["points"] == 6


def test_cli_errors_name_the_problem(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    with pytest.raises(SystemExit, match="no finished member"):
        main(["sweep", "collect", str(sweep)])
    capsys.readouterr()
    for argv, message in ((["collect", str(sweep), "--out-dir", "x"], "unrecognized arguments: --out-dir x"),
                          (["fit", "x.csv", "--partition", "gpu"], "unrecognized arguments: --partition gpu"),
                          (["fit"], "the following arguments are required: RESULTS.csv")):
        with pytest.raises(SystemExit):
            main(["sweep", *argv])
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    write_csv([{"member": "m", "family": "f", "N": 1, "D": "lots", "C": 1, "loss": 1.0, "metric": "x"}], bad)
    with pytest.raises(SystemExit, match=r"bad.csv, line 2: column 'D': expected a number, got 'lots'"):
        main(["sweep", "fit", str(bad)])
