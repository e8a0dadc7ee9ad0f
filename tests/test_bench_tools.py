"""The benchmark scripts run end to end at toy sizes on CPU and write the JSON they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).parent.parent / "tools"


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_bench_sp_measures_the_exchange(tmp_path):
    out = tmp_path / "sp.json"
    done = run_tool("bench_sp.py", "--sp", "1", "2", "--models", "gla", "transformer_psm", "--tokens-per-rank", "128",
                    "--d-model", "32", "--layers", "2", "--heads", "2", "--chunk", "16", "--steps", "1", "--warmup", "0",
                    "--json", str(out))
    rows = {(r["model"], r["sp"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("gla", 1), ("gla", 2), ("transformer_psm", 1), ("transformer_psm", 2)}
    assert all(rows[m, 1]["exchange_s"] == 0 and rows[m, 2]["exchange_s"] > 0 for m in ("gla", "transformer_psm"))
    assert rows["gla", 2]["seq_len"] == 256 and "| gla | " in done.stdout


def test_bench_checkpoint_reports_blocked_and_write_time(tmp_path):
    out = tmp_path / "ckpt.json"
    run_tool("bench_checkpoint.py", "--d-model", "32", "--layers", "1", "--heads", "2", "--steps", "4",
             "--save-every", "2", "--dir", str(tmp_path), "--json", str(out))
    result = json.loads(out.read_text())["result"]
    assert result["saves"] == 2 and result["state_GB"] > 0
    assert result["blocked_s_per_save"] >= 0 and result["write_s_per_save"] > 0


def test_results_runner_and_plots(tmp_path):
    """tools/bench_results.py probes, sizes and trains two tiny S5 runs on CPU; tools/plot_results.py
    turns its output directory into the S5 table and figure."""
    root = TOOLS.parent
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
group: s5
steps: {{min: 4, max: 4, round: 2}}
eval_points: 2
scale: {{data.curriculum_steps: 0.25}}
set: [train.batch_size=4, data.max_len=6, "data.eval_seq_lens=[6, 9]", train.eval_batches=1, train.eval_batch_size=4,
      train.device=cpu]
runs:
  - {{name: s5_psm_c1_s0, config: {root}/configs/results/s5_psm_c1.yaml,
     set: [model.d_model=16, model.n_heads=2, model.inf_layers=1]}}
  - {{name: s5_transformer_s0, config: {root}/configs/results/s5_transformer.yaml,
     set: [model.d_model=16, model.n_heads=2, model.n_layers=1]}}
""")
    out = tmp_path / "runs"
    run_tool("bench_results.py", str(plan), "--out-dir", str(out), "--probe-steps", "4", "--budget-s", "1", "--kill-after", "200")
    summary = json.loads((out / "summary.json").read_text())
    for name in ("s5_psm_c1_s0", "s5_transformer_s0"):
        assert summary["runs"][name]["returncode"] == 0 and summary["runs"][name]["steps"] == 4
        assert set(summary["runs"][name]["final"]) == {"6", "9"}
    done = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots"), "--tag", "_toy")
    assert (tmp_path / "plots" / "results_s5_toy.png").stat().st_size > 0
    assert "| Transformer-PSM c=1 | " in done.stdout and "| Transformer | " in done.stdout


def write_s3_plan(path: Path, names: list[str], eval_lens: str, extra: str = "") -> Path:
    """A bench_results plan of tiny CPU runs of S3 (the named ones of s3_psm_c1_s0, s3_transformer_s0)."""
    root = TOOLS.parent
    runs = {
        "s3_psm_c1_s0": f"{{name: s3_psm_c1_s0, config: {root}/configs/results/s3_cpu_psm_c1.yaml, "
                        "set: [model.d_model=16, model.inf_layers=1]}",
        "s3_transformer_s0": f"{{name: s3_transformer_s0, config: {root}/configs/results/s3_cpu_transformer.yaml, "
                             "set: [model.d_model=16, model.n_layers=1]}",
    }
    path.write_text(f"""
group: s3
eval_points: 1
set: [train.batch_size=4, data.max_len=6, "data.eval_seq_lens={eval_lens}", train.eval_batches=1, train.eval_batch_size=4,
      train.device=cpu, data.degree=3{extra}]
runs:
""" + "".join(f"  - {runs[name]}\n" for name in names))
    return path


def test_results_runner_sequential_and_added_runs(tmp_path):
    """--sequential --steps N: no probe, the runs one after another; a later --only call adds a run to the
    same directory's summary.json without dropping the earlier ones. A degree-3 group (S3) plots with its name."""
    plan = write_s3_plan(tmp_path / "plan.yaml", ["s3_psm_c1_s0", "s3_transformer_s0"], eval_lens="[6, 9]")
    out = tmp_path / "runs"
    run_tool("bench_results.py", str(plan), "--out-dir", str(out), "--sequential", "--steps", "3",
             "--only", "s3_psm_c1_s0", "--budget-s", "200")
    run_tool("bench_results.py", str(plan), "--out-dir", str(out), "--sequential", "--steps", "2",
             "--only", "s3_transformer_s0", "--budget-s", "200")
    summary = json.loads((out / "summary.json").read_text())
    assert [summary["runs"][n]["steps"] for n in ("s3_psm_c1_s0", "s3_transformer_s0")] == [3, 2]
    assert all(r["returncode"] == 0 for r in summary["runs"].values()) and not (out / "probe_plain").exists()
    done = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots"), "--tag", "_s3", "--log-acc")
    assert "### S3 (not S5) (runs)" in done.stdout and "chance 1/6" in done.stdout
    assert "| Transformer-PSM c=1 | " in done.stdout and "| Transformer | " in done.stdout
    assert "then only the sign" in done.stdout and "| s3_psm_c1_s0 | " in done.stdout
    assert "Sign accuracy" in done.stdout  # the trainer's eval.json now holds group_acc_by_position
    assert (tmp_path / "plots" / "results_s5_s3.png").is_file()


def test_results_runner_stops_a_run_at_its_limit_and_resumes_it(tmp_path):
    """A run over ``--budget-s`` × ``--kill-after`` gets SIGTERM and saves a checkpoint ("stopped");
    ``--resume`` continues it in the same directory, appending to its log, as across two GPU calls."""
    plan = write_s3_plan(tmp_path / "plan.yaml", ["s3_psm_c1_s0"], eval_lens="[6]", extra=", checkpoint.every=0")
    out, run_dir = tmp_path / "runs", tmp_path / "runs" / "s3_psm_c1_s0"
    common = [str(plan), "--out-dir", str(out), "--sequential", "--set", "train.log_every=5"]
    run_tool("bench_results.py", *common, "--steps", "1000000", "--budget-s", "20", "--kill-after", "1")
    first = json.loads((out / "summary.json").read_text())["runs"]["s3_psm_c1_s0"]
    assert first["returncode"] == "stopped" and not first["resumed"]
    stopped = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert stopped % 5 == 0 and any((run_dir / "checkpoints").iterdir())

    run_tool("bench_results.py", *common, "--resume", "--steps", str(stopped + 10), "--budget-s", "200")
    second = json.loads((out / "summary.json").read_text())["runs"]["s3_psm_c1_s0"]
    assert second["returncode"] == 0 and second["resumed"]
    log = (run_dir / "log.txt").read_text()
    assert f"stopping at step {stopped} on a preemption signal" in log and f"at step {stopped} (saved by 1 ranks)" in log
    assert json.loads((run_dir / "eval.json").read_text())["6"]["acc"] >= 0

    third = run_tool("bench_results.py", *common, "--resume", "--steps", str(stopped + 10), "--budget-s", "200")
    assert "s3_psm_c1_s0: finished already (final.pt), kept as it is" in third.stdout
    assert json.loads((out / "summary.json").read_text())["runs"]["s3_psm_c1_s0"] == second


def test_profile_scan_needs_a_gpu():
    """A GPU-only tool: it imports on CPU and says what it needs instead of failing deep inside."""
    done = subprocess.run([sys.executable, str(TOOLS / "profile_scan.py"), "--seq-len", "64"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


def test_autotune_rows_rank_each_kernels_configs(capsys, monkeypatch):
    """The autotuning table of profile_scan.py --tunings: per kernel, fastest first, from the
    autotuner's timings (a list of quantiles or one number); kernels that did not tune are left out."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(TOOLS))
    from cuda_profile import autotune_rows, print_autotune_table

    module = SimpleNamespace(
        out_fwd=SimpleNamespace(configs_timings={"BV: 64": [0.9, 0.8, 1.0], "BV: 128": [0.5, 0.4, 0.6]}),
        state_fwd=SimpleNamespace(configs_timings={"BK: 32": 0.25}),
        untuned=SimpleNamespace(configs_timings={}),
        helper=len,
    )
    rows = autotune_rows(module)
    assert [(r["kernel"], r["config"], r["ms"]) for r in rows] == [
        ("out_fwd", "BV: 128", 0.5), ("out_fwd", "BV: 64", 0.9), ("state_fwd", "BK: 32", 0.25)]
    print_autotune_table(rows, top=1)
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == ["| out_fwd | 2 | 1 | BV: 128 | 500 |", "| state_fwd | 1 | 1 | BK: 32 | 250 |"]


def test_kernel_resources_compiles_for_hopper_without_a_gpu(tmp_path):
    """tools/kernel_resources.py: registers, spills and load widths of the scan kernels, compiled
    for sm_90 with Triton's own ptxas and cuobjdump on this CPU machine."""
    out = tmp_path / "resources.json"
    done = run_tool("kernel_resources.py", "--decay", "diagonal", "--dim", "64", "--kernels", "state_fwd", "out_fwd",
                    "--max-configs", "2", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["state_fwd", "state_fwd", "out_fwd", "out_fwd"]
    assert all(0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["ex2"] > 0 for r in rows)
    assert all(sum(r["loads"].values()) > 0 and set(r["loads"]) <= {"16B", "8B", "4B", "2B"} for r in rows)
    assert "| out_fwd | BK 32 BV 64 4 warps 2 stages |" in done.stdout
    bad = subprocess.run([sys.executable, str(TOOLS / "kernel_resources.py"), "--decay", "scalar", "--kernels", "dqk_bwd_diag"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not scalar-decay kernels" in bad.stderr


def test_shipped_plans_name_valid_runs():
    """Every run of every plan in configs/results/ loads, and the plan's and its own overrides take."""
    import yaml

    sys.path.insert(0, str(TOOLS))
    from bench_results import load_plan

    from psm_train.config import load_config

    plans = sorted((TOOLS.parent / "configs" / "results").glob("plan_*.yaml"))
    assert plans
    for path in plans:
        plan = load_plan(str(path))
        for run in plan["runs"]:
            overrides = [*plan["set"], *run["set"]]
            values = load_config(TOOLS.parent / run["config"], overrides).to_dict()
            final = dict(item.split("=", 1) for item in overrides)  # a run's own setting wins over the plan's
            for key, value in final.items():
                section, name = key.split(".")
                assert values[section][name] == yaml.safe_load(value), (path.name, run["name"], key, value)


def test_s5_position_ranges_double_beyond_the_training_length():
    sys.path.insert(0, str(TOOLS))
    from plot_results import position_ranges

    assert position_ranges(18, 180) == [(3, 18), (19, 36), (37, 72), (73, 144), (145, 180)]
    assert position_ranges(18, 18) == [(3, 18)]
    assert position_ranges(18, 10) == [(3, 10)]
    assert position_ranges(2, 5) == [(3, 4), (5, 5)]
    assert position_ranges(2, 2) == []


def test_s5_runs_group_by_model_and_variant():
    sys.path.insert(0, str(TOOLS))
    from plot_results import s5_group

    assert s5_group("s5_psm_c1_s0")[1:] == s5_group("s5_psm_c1_s3")[1:] == ("psm_c1", "Transformer-PSM c=1")
    assert s5_group("s5_psm_c1_agg2_drop")[1:] == ("psm_c1_agg2_drop", "Transformer-PSM c=1 (agg2, drop)")
    assert s5_group("s5_transformer_drop_s1")[1:] == ("transformer_drop", "Transformer (drop)")
    assert s5_group("s5_mamba2_s0")[0] > s5_group("s5_transformer_s0")[0] > s5_group("s5_psm_c1_s0")[0]
    assert s5_group("s5_psm_c16_s0") is None and s5_group("mqar_psm_c64_L128") is None  # not an S5 model named here
    # a smaller symmetric group (data.degree 3): s3_<model>..., grouped the same way
    assert s5_group("s3_psm_c1_s0")[1:] == s5_group("s3_psm_c1_s1")[1:] == ("psm_c1", "Transformer-PSM c=1")
    assert s5_group("s3_mamba2_s0")[1:] == ("mamba2", "Mamba2")
    assert s5_group("s7_psm_c1_s0") is None and s5_group("s3_cpu") is None


def test_mqar_table_shows_a_killed_runs_last_evaluation(tmp_path):
    """A run killed before its final evaluation is reported with its last logged one, marked, not as failed."""
    out = tmp_path / "mqar"
    runs = {"mqar_psm_c64_L512": {"steps": 3700}, "mqar_gla_L512": {"steps": 3700}, "mqar_transformer_L512": {"steps": 3700}}
    (out / "mqar_psm_c64_L512").mkdir(parents=True)
    (out / "mqar_psm_c64_L512" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 740, "eval/len512/acc": 0.16}, {"step": 1480, "loss": 1.0},
                                          {"step": 2960, "eval/len512/acc": 0.728}, {"step": 3000, "loss": 0.9}])
    )
    (out / "mqar_gla_L512").mkdir()  # no evaluation at all: failed
    (out / "mqar_transformer_L512").mkdir()
    (out / "mqar_transformer_L512" / "eval.json").write_text(json.dumps({"512": {"acc": 0.337}}))
    (out / "summary.json").write_text(json.dumps({"runs": runs}))

    table = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots")).stdout
    rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in table.splitlines() if line.startswith("| ")}
    assert rows["| Transformer-PSM c=64"] == "0.728 (killed; last evaluation, step 2960) |"
    assert rows["| GLA"] == "failed |"
    assert rows["| Transformer"] == "0.337 |"
    assert (tmp_path / "plots" / "results_mqar.png").is_file()


def test_mqar_rows_name_what_the_run_config_sets_apart(tmp_path):
    """Runs of one model that differ in depth, seed or precision get their own rows, labelled from config.yaml."""
    out = tmp_path / "mqar_depth"
    runs = {"mqar_transformer2_L128": {"steps": 10}, "mqar_transformer3_fp32_s1_L128": {"steps": 10}}
    configs = {"mqar_transformer2_L128": {"model": {"n_layers": 2}, "train": {"seed": 0, "precision": "auto"}},
               "mqar_transformer3_fp32_s1_L128": {"model": {"n_layers": 3}, "train": {"seed": 1, "precision": "fp32"}}}
    for name, acc in (("mqar_transformer2_L128", 0.998), ("mqar_transformer3_fp32_s1_L128", 0.331)):
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text(json.dumps(configs[name]))
        (out / name / "eval.json").write_text(json.dumps({"128": {"acc": acc}}))
    (out / "summary.json").write_text(json.dumps({"runs": runs}))

    table = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots")).stdout
    rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in table.splitlines() if line.startswith("| ")}
    assert rows["| Transformer (2 blocks)"] == "0.998 |"
    assert rows["| Transformer (3 blocks, seed 1, fp32)"] == "0.331 |"
