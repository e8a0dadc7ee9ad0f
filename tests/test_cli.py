"""End to end through the installed ``psm-train`` command: train, eval, generate, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TINY = [
    "--set", "train.steps=12", "--set", "train.batch_size=8", "--set", "train.eval_every=6",
    "--set", "train.log_every=4", "--set", "train.eval_batches=1", "--set", "train.eval_batch_size=8",
    "--set", "model.d_model=32", "--set", "model.inf_layers=1",
    "--set", "data.seq_len=32", "--set", "data.eval_seq_lens=[64]",
]


def psm_train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("psm-train")
    assert exe, "the psm-train command is not installed (pip install -e .)"
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"psm-train {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "quick"
    out = psm_train("train", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir), *TINY)
    assert "step 12/12" in out.stdout
    return run_dir


def test_train_writes_run_directory(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 6, 8, 12]  # step 1 too: the first loss shows at once
    for r in records:
        if "loss" in r:
            assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0
    assert {"eval/len32/acc", "eval/len64/acc", "eval/len32/loss"} <= set(records[-1])
    assert "d_model: 32" in (trained / "config.yaml").read_text()
    assert (trained / "final.pt").is_file()
    evals = json.loads((trained / "eval.json").read_text())
    assert len(evals["32"]["acc_by_position"]) == 32


def test_refuses_to_overwrite_a_finished_run(trained):
    out = psm_train("train", "configs/mqar_tiny.yaml", "--run-dir", str(trained), *TINY, check=False)
    assert out.returncode != 0 and "already holds a finished run" in out.stderr


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    """`timeout` or `kill` sends SIGTERM: the run saves a checkpoint at the next logged step and exits
    143; the same command then resumes from it and finishes."""
    run_dir = tmp_path / "stopped"
    args = ["train", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir), *TINY,
            "--set", "train.steps=4000", "--set", "train.eval_every=0", "--set", "checkpoint.every=0"]
    proc = subprocess.Popen([shutil.which("psm-train"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = int(err.split("stopped by a signal after step ")[1].split(";")[0])
    assert 0 < step < 4000 and f"stopping at step {step} on a preemption signal" in out
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")], "no checkpoint"
    resumed = psm_train(*args, "--set", f"train.steps={step + 8}")
    assert f"at step {step} (saved by 1 ranks)" in resumed.stdout
    assert f"step {step + 8}/{step + 8}" in resumed.stdout
    assert (run_dir / "final.pt").is_file()


def test_eval_prints_a_table_per_length(trained):
    out = psm_train("eval", str(trained), "--set", "data.eval_seq_lens=[96]")
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["length", "loss", "accuracy", "scored"]
    assert lines[0].endswith("2 length(s) on cpu")  # said before the first length is evaluated
    assert [line.split()[0] for line in lines[2:4]] == ["32", "96"]  # a row per length, printed as it finishes


def test_s5_run_logs_and_prints_the_sign_accuracy(tmp_path):
    run_dir = tmp_path / "s5"
    psm_train("train", "configs/s5_psm_c1.yaml", "--run-dir", str(run_dir), "--set", "train.steps=2",
              "--set", "train.batch_size=4", "--set", "train.eval_batches=1", "--set", "train.eval_batch_size=4",
              "--set", "model.d_model=32", "--set", "model.inf_layers=1", "--set", "data.max_len=6",
              "--set", "data.eval_seq_lens=[8]", "--set", "train.device=cpu")
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= record["eval/len8/group_acc"] <= 1 and record["eval/len8/acc"] <= record["eval/len8/group_acc"]
    assert len(json.loads((run_dir / "eval.json").read_text())["8"]["group_acc_by_position"]) == 8
    lines = psm_train("eval", str(run_dir), "--out", str(tmp_path / "again.json")).stdout.splitlines()
    assert lines[1].split() == ["length", "loss", "accuracy", "scored", "sign", "acc"]
    # --out writes eval.json's format; the same weights and held-out set on CPU give the same numbers
    again, trained = (json.loads(f.read_text())["8"] for f in (tmp_path / "again.json", run_dir / "eval.json"))
    assert again["acc_by_position"] == trained["acc_by_position"] and again["loss"] == pytest.approx(trained["loss"])


def test_generate_prints_continuation_and_state(trained):
    out = psm_train("generate", str(trained / "final.pt"), "--max-new-tokens", "5")
    assert "continuation (5 tokens):" in out.stdout
    assert "roots=" in out.stdout and "state_bytes=" in out.stdout
    out = psm_train("generate", str(trained), "--prompt", "1,2,3", "--max-new-tokens", "2", "--temperature", "1.0")
    assert "prompt (3 tokens): 1 2 3" in out.stdout
    bad = psm_train("generate", str(trained), "--prompt", "1,999", check=False)
    assert bad.returncode != 0 and "outside the vocabulary" in bad.stderr


def test_bad_override_stops_before_training(tmp_path):
    run_dir = tmp_path / "never"
    out = psm_train("train", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir), "--set", "train.lr=-1", check=False)
    assert out.returncode == 2
    assert "configs/mqar_tiny.yaml: train.lr: expected a positive number" in out.stderr
    assert not run_dir.exists()


def test_wandb_offline_needs_no_login(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wb"
    psm_train("train", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir), *TINY, "--set", "wandb.enabled=true")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(offline_runs[0].glob("*.wandb"))


def test_plot_metrics_writes_png(trained, tmp_path):
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "tools/plot_metrics.py", str(trained), "--out", str(out)], check=True,
                          timeout=120, capture_output=True, text=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "| length | step 6 | step 12 |" in done.stdout
    at = {r["step"]: r for r in records}
    assert f"| 64 | {at[6]['eval/len64/acc']:.3f} | {at[12]['eval/len64/acc']:.3f} |" in done.stdout


def test_version_and_a_help_that_does_not_import_torch():
    assert psm_train("--version").stdout.strip() == "psm-train 0.1.0"
    out = subprocess.run([sys.executable, "-c", "import sys\nfrom psm_train.cli import build_parser\n"
                          "build_parser().format_help()\nprint(sorted(m for m in ('torch', 'numpy', 'submitit') if m in sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_unparsable_override_and_zero_ranks_are_refused_in_one_line(tmp_path):
    out = psm_train("train", "configs/mqar_tiny.yaml", "--run-dir", str(tmp_path / "x"), "--set", "train.lr=[1,2", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--set 'train.lr=[1,2': the value of train.lr is not valid YAML" in out.stderr
    out = psm_train("train", "configs/mqar_tiny.yaml", "--nproc", "0", check=False)
    assert out.returncode == 2 and "--nproc: expected a positive integer, got 0" in out.stderr
    assert not (tmp_path / "x").exists()


def test_sweep_actions_are_subcommands():
    out = psm_train("sweep", "collect", "--help").stdout
    assert out.startswith("usage: psm-train sweep collect") and "--partition" not in out and "--bootstrap" not in out
    assert "--bootstrap" in psm_train("sweep", "fit", "--help").stdout


def test_jobs_shows_a_run_started_by_train(trained, tmp_path, capsys):
    from psm_train.cli import main
    from psm_train.train.run_lock import RunLock

    main(["jobs", str(trained)])
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:5] == ["quick", "-", "train", "COMPLETED", "12/12"]
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / "step_000000040").mkdir(parents=True)
    (stopped / "config.yaml").write_text("train:\n  steps: 100\n")
    (stopped / "metrics.jsonl").write_text('{"step": 40, "loss": 2.5}\n{"step": 50, "lo')
    main(["jobs", str(stopped)])
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:6] == ["stopped", "-", "train", "STOPPED", "40/100", "2.5000"]
    assert "resumable from checkpoints/step_000000040" in out
    with RunLock(stopped):
        main(["jobs", str(tmp_path)])  # the directory above: its runs
        out = capsys.readouterr().out
    assert "RUNNING" in out and f"pid {os.getpid()}" in out
