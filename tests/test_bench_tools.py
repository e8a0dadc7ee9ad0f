"""The benchmark scripts run end to end at toy sizes on CPU and write the JSON they promise."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


def test_results_sweep_and_plots(tmp_path):
    """A results sweep of named members (two tiny S3 runs on CPU, at once) through `psm-train sweep --executor
    local`; tools/plot_results.py turns its output directory into the S3 table and figure, by member name."""
    root = TOOLS.parent
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
config: {root}/configs/results/s3_cpu_psm_c1.yaml
out_dir: {tmp_path}/runs
set: {{train.steps: 3, train.batch_size: 4, data.max_len: 6, data.eval_seq_lens: [6, 9], train.eval_batches: 1,
       train.eval_batch_size: 4, train.device: cpu, train.threads: 1, data.degree: 3}}
list:
  - {{name: s3_psm_c1_s0, model.d_model: 16, model.inf_layers: 1}}
  - {{name: s3_transformer_s0, config: {root}/configs/results/s3_cpu_transformer.yaml, model.d_model: 16,
     model.n_layers: 1}}
local: {{max_parallel: 2}}
""")
    done = subprocess.run([sys.executable, "-m", "psm_train", "sweep", str(sweep), "--executor", "local"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "runs"
    assert all((out / name / "final.pt").is_file() for name in ("s3_psm_c1_s0", "s3_transformer_s0"))
    done = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots"), "--tag", "_s3", "--log-acc")
    assert "### S3 (not S5) (runs)" in done.stdout and "chance 1/6" in done.stdout
    assert "| Transformer-PSM c=1 | " in done.stdout and "| Transformer | " in done.stdout
    assert "then only the sign" in done.stdout and "| s3_psm_c1_s0 | " in done.stdout
    assert "Sign accuracy" in done.stdout  # the trainer's eval.json holds group_acc_by_position
    assert (tmp_path / "plots" / "results_s5_s3.png").is_file()


def test_profile_scan_needs_a_gpu():
    """A GPU-only tool: it imports on CPU and says what it needs instead of failing deep inside."""
    done = subprocess.run([sys.executable, str(TOOLS / "profile_scan.py"), "--seq-len", "64"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


def test_gpu_benchmarks_need_a_gpu():
    for tool in ("bench_models.py", "bench_scan.py", "bench_attention.py"):
        done = subprocess.run([sys.executable, str(TOOLS / tool)], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"{tool} needs a CUDA GPU" in done.stderr, done.stderr[-2000:]


def test_isolated_run_turns_failures_into_errors(monkeypatch, tmp_path):
    """tools/isolated_run.py: the child's result, or "oom", "timeout after N s" or its exit status and last
    stderr line; a child past its limit is killed with its process group (its own children included)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    from isolated_run import OOM, run_isolated

    def child(code: str, timeout_s: float = 60):
        prelude = "import sys, time\nsys.path.insert(0, %r)\nfrom isolated_run import write_result\n" % str(TOOLS)
        return run_isolated([sys.executable, "-c", prelude + code], timeout_s)

    assert child("write_result(sys.argv[sys.argv.index('--row-out') + 1], {'ms': 1.5})") == ({"ms": 1.5}, None)
    assert child("raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')") == (None, OOM)
    assert child("sys.exit('bad shape')") == (None, "exit 1: bad shape")
    start, pid_file = time.time(), tmp_path / "grandchild.pid"
    grandchild = (
        "import subprocess\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    assert child(grandchild + "time.sleep(60)", timeout_s=5) == (None, "timeout after 5 s")
    assert time.time() - start < 30

    def alive(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended

    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_benchmarks_run_each_configuration_in_a_child(monkeypatch):
    """bench_models.py and bench_scan.py hand each configuration to a child process (the script with
    --one) and turn its failure into an error row: here the child stops at its GPU check."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench_models
    import bench_scan

    args = SimpleNamespace(tokens=4096, warmup=1, steps=1, profile=0, compile=True, shape_timeout=120)
    row = bench_models.measure_isolated("gla", 2048, args)
    assert row["error"] == "exit 1: bench_models.py needs a CUDA GPU", row
    assert (row["model"], row["T"], row["batch"], row["params_M"], row["compiled"]) == ("gla", 2048, 2, None, True)
    args = SimpleNamespace(batch=2, heads=2, ref_max_len=64, chunk=64, shape_timeout=120)
    assert bench_scan.measure_isolated("diagonal", 64, 128, args) == [
        dict(decay="diagonal", D=64, T=128, impl="all", error="exit 1: bench_scan.py needs a CUDA GPU")]


def test_autotune_rows_rank_each_kernels_configs(capsys, monkeypatch):
    """The autotuning table of profile_scan.py --tunings: per kernel, fastest first, from the
    autotuner's timings (a list of quantiles or one number); kernels that did not tune are left out."""
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


def test_shipped_sweeps_load():
    """Every sweep file in configs/sweeps/ loads: every member's config (and branch) is valid."""
    from psm_train.launch.sweep import load_sweep

    sweeps = sorted((TOOLS.parent / "configs" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        assert load_sweep(path).members, path


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


def test_bench_generation_times_the_full_carry(tmp_path):
    """Contexts c·(2^k − 1) for every model; the jump checked against stepping; the carry step timed."""
    out = tmp_path / "gen.json"
    done = run_tool("bench_generation.py", "--tiny", "--device", "cpu", "--chunk", "4", "--min-context", "8",
                    "--max-context", "32", "--repeats", "2", "--check", "--out", str(out))
    assert "carries through all k levels" in done.stdout
    data = json.loads(out.read_text())
    rows = {(r["model"], r["context"]): r for r in data["rows"]}
    models = ("transformer", "transformer_psm", "gla", "mamba2")
    assert set(rows) == {(m, n) for m in models for n in (4, 12, 28)}
    for (model, n), r in rows.items():
        assert r["chunks"] == n // 4 and r["levels"] == (n // 4).bit_length() and r["full_carry"] and r["window"] == 8
        assert 0 < r["ms_median"] <= r["ms_p99"] <= r["ms_max"] and r["ms_carry"] > 0 and r["ms_after_carry"] > 0
        assert r["state_bytes"] > 0
    psm = [rows["transformer_psm", n] for n in (4, 12, 28)]
    assert [r["roots_at_jump"] for r in psm] == [1, 2, 3]
    # the KV cache grows with the context; the recurrent states do not
    assert rows["transformer", 28]["state_bytes"] > rows["transformer", 4]["state_bytes"]
    assert rows["gla", 28]["state_bytes"] == rows["gla", 4]["state_bytes"]
    assert "| transformer_psm c4 | 28 | 7 | 3 |" in done.stdout


def test_activation_memory_counts_what_checkpointing_keeps():
    sys.path.insert(0, str(TOOLS))
    from activation_memory import measure

    ac = ["parallel.activation_checkpointing=true"]
    rows = [measure("configs/mqar_tiny.yaml", o, seq_len=32, batches=(1, 3))
            for o in ([], [*ac, "parallel.checkpoint_every=2"], ac)]
    per_token = [r["saved_kib_per_token"] for r in rows]
    assert per_token[0] > per_token[1] > per_token[2] > 0  # all blocks, every other one recomputed, all recomputed
    assert all(r["parameters"] == rows[0]["parameters"] for r in rows)


def test_activation_memory_writes_its_table_and_json(tmp_path):
    out = tmp_path / "activation_memory.json"
    done = run_tool("activation_memory.py", "--only", "transformer", "--seq-len", "8", "--out", str(out))
    assert "x transformer" in done.stdout and "1.00" in done.stdout
    result = json.loads(out.read_text())
    assert result["rows"]["transformer"]["saved_kib_per_token"] > 0 and "--seq-len 8" in result["command"]


def test_mqar_distance_table_from_eval_json(tmp_path):
    """Runs whose eval.json scores acc_by_distance get a row each: placement, filler, overall and per distance."""
    out = tmp_path / "mqar_distance"
    res = {"acc": 0.5, "acc_by_distance": {"same": 0.9, "1": 0.6, ">=2": None},
           "scored_by_distance": {"same": 10, "1": 30, ">=2": 0}}
    for name, placement in (("psm,query_placement=uniform", "uniform"), ("psm,query_placement=power_law", "power_law")):
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text(json.dumps(
            {"train": {"steps": 5}, "data": {"seq_len": 128, "query_placement": placement, "filler": "random",
                                              "distance_chunk": 16}}))
        (out / name / "eval.json").write_text(json.dumps({"128": res}))
    table = run_tool("plot_results.py", "--runs", str(out), "--out-dir", str(tmp_path / "plots")).stdout
    assert "chunks of 16 tokens" in table
    assert "| psm,query_placement=uniform | uniform | random | 0.500 | 0.900 (10) | 0.600 (30) | – |" in table
    assert (tmp_path / "plots" / "results_mqar_distance.png").is_file()
