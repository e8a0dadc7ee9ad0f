"""Launch pieces that need no cluster: time limits, sweep expansion, the preemption flag's
agreement across ranks (gloo), the job registry, dry runs and config errors before submission."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from psm_train.config import ConfigError
from psm_train.launch import registry
from psm_train.train import preemption
from psm_train.launch.submit import Resources, SubmissionError, sbatch_script, time_minutes
from psm_train.launch.sweep import load_sweep, member_values, slug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_limits_in_slurm_syntax():
    assert time_minutes("90") == 90
    assert time_minutes("1:30:00") == 90
    assert time_minutes("10:30") == 11  # minutes:seconds, rounded up
    assert time_minutes("2-00") == 2880
    assert time_minutes("1-02:03") == 1563
    with pytest.raises(SubmissionError, match="expected minutes or"):
        time_minutes("1h")


def test_sbatch_script_has_one_task_per_gpu_and_the_usr2_signal(tmp_path):
    res = Resources(nodes=2, gpus_per_node=8, partition="gpu", account="lab", qos="high", time="2:00:00",
                    constraint="h200", mem="500G", exclusive=True)
    script = sbatch_script(res, "psm-x", tmp_path / "logs")
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=lab",
                 "--qos=high", "--time=120", "--constraint=h200", "--mem=500G", "--exclusive", "--requeue",
                 "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in script
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    assert "--array=0-5%2" in sbatch_script(Resources(array_parallelism=2), "s", tmp_path, array_size=6)
    with pytest.raises(SubmissionError, match="one task per GPU"):
        Resources(gpus_per_node=4, tasks_per_node=2).validate()


def test_sweep_grid_times_list_and_member_names(tmp_path):
    values = member_values({"train.lr": [1, 2]}, [{"model.name": "gla"}, {"model.name": "retnet"}])
    assert values == [{"model.name": "gla", "train.lr": 1}, {"model.name": "gla", "train.lr": 2},
                      {"model.name": "retnet", "train.lr": 1}, {"model.name": "retnet", "train.lr": 2}]
    assert slug({"train.lr": 0.001, "model.name": "gla"}) == "lr=0.001,name=gla"
    assert slug({"model": {"name": "transformer", "d_model": 32}}) == "name=transformer,d_model=32"
    assert slug({"a.x": 1, "b.x": 2}) == "a.x=1,b.x=2"
    assert len(slug({f"k{i}": "v" * 20 for i in range(8)})) == 80


def test_a_named_entry_with_a_grid_names_each_point(tmp_path):
    sweep = load_sweep(_write_sweep(tmp_path, """\
        set: {train.steps: 5}
        grid: {model.d_model: [32, 48]}
        list:
          - {name: tf, model: {name: transformer, n_layers: 1}}
        """))
    assert [m.slug for m in sweep.members] == ["tf,d_model=32", "tf,d_model=48"]
    assert sweep.members[1].cfg.name == "tf,d_model=48" and sweep.members[1].cfg.model.config.d_model == 48
    assert sweep.members[1].cfg.run_dir == str(tmp_path / "out" / "tf,d_model=48")


def _write_sweep(tmp_path, body: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(f"""\
        config: {REPO}/configs/mqar_tiny.yaml
        out_dir: {tmp_path}/out
        """) + textwrap.dedent(body))
    return path


def test_sweep_members_are_validated_configs(tmp_path):
    sweep = load_sweep(_write_sweep(tmp_path, """\
        set: {train.steps: 5}
        grid: {model.d_model: [32, 48]}
        list:
          - {model: {name: transformer, n_layers: 1}}
          - {model.chunk_size: 4}
        slurm: {cpus_per_task: 1, array_parallelism: 3}
        """))
    # the list entry replaces the whole model section; the grid's d_model then applies to it
    assert [m.slug for m in sweep.members] == [
        "name=transformer,n_layers=1,d_model=32", "name=transformer,n_layers=1,d_model=48",
        "chunk_size=4,d_model=32", "chunk_size=4,d_model=48"]
    assert sweep.members[1].cfg.model.name == "transformer" and sweep.members[1].cfg.model.config.d_model == 48
    assert sweep.members[3].cfg.model.config.chunk_size == 4 and sweep.members[3].cfg.train.steps == 5
    assert sweep.members[3].cfg.run_dir == str(tmp_path / "out" / "chunk_size=4,d_model=48")
    assert sweep.resources.array_parallelism == 3

    with pytest.raises(ConfigError, match=r"member lr=-1: .*train.lr: expected a positive number"):
        load_sweep(_write_sweep(tmp_path, "grid: {train.lr: [-1]}\n"))
    with pytest.raises(ConfigError, match="slurm.gpus: unknown field"):
        load_sweep(_write_sweep(tmp_path, "slurm: {gpus: 1}\n"))
    with pytest.raises(ConfigError, match="grid.train.lr: expected a non-empty list"):
        load_sweep(_write_sweep(tmp_path, "grid: {train.lr: 0.1}\n"))


def test_registry_counts_each_restart_once(tmp_path):
    for rank in (0, 1):  # two ranks recording the same failed attempt
        registry.append(tmp_path, "requeued", job_id="7", restart=0, kind="failed", rank=rank, reason="x")
    registry.append(tmp_path, "requeued", job_id="7", restart=1, kind="preempted", rank=0, reason="y")
    registry.append(tmp_path, "requeued", job_id="8", restart=0, kind="failed", rank=0, reason="z")
    assert registry.requeues(tmp_path, "7", "failed") == 1
    assert registry.requeues(tmp_path, "7", "preempted") == 1


def _agree(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    preemption.install()
    first = preemption.should_stop()
    if rank == 1:  # only rank 1 is signalled, as when a signal reaches one task first
        os.kill(os.getpid(), signal.SIGUSR2)
    second = preemption.should_stop()
    results[rank] = (first, second, preemption.stop_signal())
    dist.destroy_process_group()


def test_should_stop_agrees_across_ranks():
    from psm_train.launch.submit import free_port

    results = mp.Manager().dict()
    mp.spawn(_agree, args=(free_port(), results), nprocs=2)
    assert dict(results) == {0: (False, True, signal.SIGUSR2), 1: (False, True, signal.SIGUSR2)}


def test_sigterm_sets_the_flag_without_requeue_priority():
    code = ("import os, signal; from psm_train.train import preemption as p; p.install();"
            "os.kill(os.getpid(), signal.SIGTERM); assert p.should_stop(); print(p.stop_signal().name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "SIGTERM", out.stderr


def psm_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("psm-train"), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_sbatch_parameters_and_submits_nothing(tmp_path):
    out = psm_train("submit", "configs/mqar_tiny.yaml", "--run-dir", str(tmp_path / "r"), "--nodes", "2",
                    "--gpus-per-node", "4", "--partition", "gpu", "--time", "30", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"run dir: {tmp_path / 'r'}" in out.stdout and "tasks:   8 (2 node(s) x 4)" in out.stdout
    assert "#SBATCH --gpus-per-node=4" in out.stdout and "#SBATCH --partition=gpu" in out.stdout
    assert not (tmp_path / "r").exists()


def test_config_error_stops_before_submission(tmp_path):
    out = psm_train("submit", "configs/mqar_tiny.yaml", "--run-dir", str(tmp_path / "r"), "--set", "model.d_model=-4")
    assert out.returncode == 2
    assert "configs/mqar_tiny.yaml: model.d_model" in out.stderr
    assert not (tmp_path / "r").exists()


def test_local_executor_runs_the_job_here_and_waits(tmp_path):
    run_dir = tmp_path / "local"
    tiny = ["--set", "train.steps=8", "--set", "train.batch_size=8", "--set", "train.eval_every=0",
            "--set", "train.log_every=4", "--set", "train.eval_batches=1", "--set", "train.eval_batch_size=8",
            "--set", "model.d_model=32", "--set", "model.inf_layers=1", "--set", "data.seq_len=32",
            "--set", "data.eval_seq_lens=[32]"]
    out = psm_train("submit", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir), *tiny, "--executor", "local")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(local, 1 task(s))" in out.stdout and out.stdout.rstrip().endswith("finished")
    assert (run_dir / "final.pt").is_file()
    row = psm_train("jobs", str(run_dir)).stdout.splitlines()[1].split()
    assert row[2:5] == ["local", "COMPLETED", "8/8"]


def test_local_wait_shows_the_newest_logged_step(tmp_path):
    """`submit --executor local` prints each new logged step while it waits; a line being written is skipped."""
    from psm_train.launch.cli import _last_logged

    assert _last_logged(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 2.5}\n{"step": 5, "checkpoint/blocked_s": 0.1}\n{"step": 8, "lo')
    assert _last_logged(tmp_path) == "step 4 loss 2.5000"
