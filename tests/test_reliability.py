"""Faults around a run: a killed launcher's ranks, two trainers on one run directory, a half-written metrics line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psm_train.train.metrics import truncate_metrics
from psm_train.train.run_lock import RunDirLocked, RunLock, lock_holder


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Any thread of ``pid`` not yet a zombie: a killed leader shows Z while its other threads still exit,
    holding the file table (and the run directory's flock) until the last one is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            if Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkilled_launcher_takes_its_ranks_along_and_a_restart_runs(tmp_path):
    run_dir = tmp_path / "run"
    args = [shutil.which("psm-train"), "train", "configs/mqar_tiny.yaml", "--nproc", "2", "--run-dir", str(run_dir),
            "--set", "train.steps=100000", "--set", "train.device=cpu", "--set", "train.threads=1",
            "--set", "train.log_every=1", "--set", "checkpoint.every=5"]
    log = tmp_path / "launcher.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None:
            ranks = children(launcher.pid)  # torchrun (the launcher, after exec) is the ranks' parent
            if len(ranks) == 2 and (run_dir / "metrics.jsonl").is_file():  # both ranks are past cmd_train's start
                break
            time.sleep(0.2)
        assert launcher.poll() is None and len(ranks) == 2, f"the 2-rank run did not start:\n{log.read_text()[-3000:]}"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while any(alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(r) for r in ranks), f"ranks outlived their launcher:\n{log.read_text()[-3000:]}"
    finally:
        for pid in [launcher.pid, *ranks]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert lock_holder(run_dir) is None  # a dead trainer holds no lock
    with RunLock(run_dir):  # an immediate restart gets the directory
        pass


def test_second_trainer_on_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from psm_train.train.run_lock import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"{tmp_path} is in use by pid {holder.pid} on .*started .*-c"):
            RunLock(tmp_path).acquire()
        assert lock_holder(tmp_path)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path) as lock:  # released by the holder's death; the record is ours now
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):  # another open file in this process too
            RunLock(tmp_path).acquire()


def test_truncate_metrics_drops_a_partial_last_line_and_names_damage_elsewhere(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)]
    path.write_text("\n".join(records) + '\n{"step": 40, "lo')  # a full disk cut the last write
    truncate_metrics(path, 20)
    assert path.read_text() == records[0] + "\n" + records[1] + "\n"
    assert "metrics.jsonl:4: dropping a partly written last line" in capsys.readouterr().err
    path.write_text(records[0] + "\n{garbage\n" + records[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        truncate_metrics(path, 30)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one mqar_tiny checkpoint (about 1.9 MB), not two; skipped where mount is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_stops_the_run_naming_step_and_path_then_resume_works(small_disk):
    run_dir = small_disk / "run"
    args = [shutil.which("psm-train"), "train", "configs/mqar_tiny.yaml", "--run-dir", str(run_dir),
            "--set", "train.steps=40", "--set", "checkpoint.every=5", "--set", "train.log_every=5",
            "--set", "train.eval_every=0", "--set", "train.device=cpu", "--set", "train.threads=1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    shard = run_dir / "checkpoints" / ".tmp_step_000000010" / "rank00000.pt"
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"checkpoint of step 10 not saved: writing {shard} failed: OSError: [Errno 28] No space left" in out.stderr
    assert "step 40/40" not in out.stdout  # stopped, not trained on
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000000005"]
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 15, "lo')  # what a write cut by the full disk leaves
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    out = subprocess.run([*args, "--set", "train.steps=12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "dropping a partly written last line" in out.stderr and "step 12/12" in out.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12
