"""Sweeps on this machine through the real trainer (tiny CPU runs): members running at once, a wall-clock
budget that stops them with a checkpoint, a re-run that finishes them, and WSD decay branches that
resume from their stable run's checkpoint at the branch point and are collected as their own points."""

import io
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from psm_train.config import ConfigError, load_config
from psm_train.launch.collect import collect
from psm_train.launch.local import run_local
from psm_train.launch.sweep import LocalOptions, load_sweep, member_status
from psm_train.train.flops import train_flops_per_token
from psm_train.train.optim import lr_at

REPO = Path(__file__).resolve().parent.parent
TINY = {"train.batch_size": 8, "train.warmup_steps": 2, "train.eval_every": 0, "train.eval_batches": 1,
        "train.eval_batch_size": 8, "train.log_every": 1, "train.threads": 1, "train.device": "cpu",
        "model.d_model": 16, "model.inf_layers": 1, "data.eval_seq_lens": [32]}


def _sweep(tmp_path: Path, body: str, **extra_set) -> Path:
    path = tmp_path / "sweep.yaml"
    common = {**TINY, **extra_set}
    path.write_text(f"config: {REPO}/configs/mqar_tiny.yaml\nout_dir: {tmp_path}/out\n"
                    f"set: {json.dumps(common)}\n" + textwrap.dedent(body))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_members_run_at_once(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, "grid: {train.seed: [0, 1]}\n", **{"train.steps": 40}))
    runs = run_local(sweep, sweep.members, LocalOptions(max_parallel=2), refresh_s=1, stream=io.StringIO(), gpus=[])
    assert [r.state for r in runs] == ["done", "done"], [r.note for r in runs]
    # each trainer wrote config.yaml when it started and final.pt when it ended: the intervals overlap
    dirs = [Path(m.cfg.run_dir) for m in sweep.members]
    assert max((d / "config.yaml").stat().st_mtime for d in dirs) < min((d / "final.pt").stat().st_mtime for d in dirs)
    assert max(r.started for r in runs) < min(r.ended for r in runs)


def test_budget_stops_members_with_a_checkpoint_and_a_rerun_finishes_them(tmp_path):
    path = _sweep(tmp_path, "grid: {train.seed: [0, 1]}\n", **{"train.steps": 1_000_000})
    sweep = load_sweep(path)
    log = io.StringIO()
    runs = run_local(sweep, sweep.members, LocalOptions(max_parallel=2), budget_s=20, refresh_s=1, stream=log)
    assert [r.state for r in runs] == ["stopped", "stopped"], log.getvalue()
    assert [r.returncode for r in runs] == [143, 143]
    dirs = [Path(m.cfg.run_dir) for m in sweep.members]
    stopped = [_metrics(d)[-1]["step"] for d in dirs]
    assert all((d / "checkpoints" / f"step_{s:09d}").is_dir() for d, s in zip(dirs, stopped))
    events = [json.loads(line)["event"] for line in (dirs[0] / "jobs.jsonl").read_text().splitlines()]
    assert events == ["submitted", "started", "stopped"]

    # the same sweep, now with an end in reach: both resume from their checkpoints and finish
    end = max(stopped) + 3
    path.write_text(path.read_text().replace('"train.steps": 1000000', f'"train.steps": {end}'))
    sweep = load_sweep(path)
    assert set(member_status(sweep).values()) == {"resume"}
    runs = run_local(sweep, sweep.members, LocalOptions(max_parallel=2), refresh_s=1, stream=io.StringIO())
    assert [r.state for r in runs] == ["done", "done"]
    for d, s in zip(dirs, stopped):
        log = "".join(p.read_text() for p in d.glob("logs/*_0_log.out"))
        assert f"stopping at step {s} " in log and f"at step {s} (saved by 1 ranks)" in log
        assert _metrics(d)[-1]["step"] == end and (d / "final.pt").is_file()
    assert set(member_status(sweep).values()) == {"finished"}


BRANCHED = """\
    list:
      - {train.schedule: wsd, train.steps: 12, train.decay_steps: 2, checkpoint.every: 4, checkpoint.keep_every: 4}
    branches:
      steps: [6, 10]
      decay_steps: 2
    """


def test_decay_branches_resume_from_the_stable_runs_checkpoint(tmp_path):
    path = _sweep(tmp_path, BRANCHED)
    sweep = load_sweep(path)
    stable, short, long = sweep.members
    assert (short.parent, short.branch_step, long.branch_step) == (stable.slug, 4, 8)
    assert short.slug == f"{stable.slug},branch=6" and short.cfg.train.steps == 6 and short.cfg.train.decay_steps == 2
    assert member_status(sweep)[short.slug] == "waiting"

    out = subprocess.run([shutil.which("psm-train"), "sweep", str(path), "--executor", "local", "--max-parallel", "2",
                          "--refresh", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    stable_dir = Path(stable.cfg.run_dir)
    stable_metrics = {r["step"]: r for r in _metrics(stable_dir)}
    for branch in (short, long):
        run_dir, s = Path(branch.cfg.run_dir), branch.branch_step
        assert json.loads((run_dir / "branch.json").read_text())["step"] == s
        log = "".join(p.read_text() for p in (run_dir / "logs").glob("*_0_log.out"))
        assert f"step_{s:09d} at step {s} " in log
        records = _metrics(run_dir)
        assert [r["step"] for r in records] == list(range(1, branch.cfg.train.steps + 1))
        assert records[:s] == [stable_metrics[k] for k in range(1, s + 1)]  # the stable run's, up to the branch point
        cfg = load_config(run_dir / "member.yaml")
        assert [r["lr"] for r in records[s:]] == pytest.approx([lr_at(k, cfg.train) for k in range(s, cfg.train.steps)])
        assert records[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["tokens"] == branch.cfg.train.steps * 8 * 32  # the whole run's tokens, stable part included
    # the branch did not take the stable run's files away: hard links, pruned only in the branch's own directory
    assert (stable_dir / "checkpoints" / "step_000000004" / "manifest.json").is_file()

    got = collect(path, "train_loss")
    rows = {r["member"]: r for r in got.rows}
    assert [rows[m.slug]["D"] for m in sweep.members] == [12 * 256, 6 * 256, 10 * 256]
    assert rows[long.slug]["branch_of"] == stable.slug and rows[long.slug]["branch_step"] == 8
    assert rows[long.slug]["branch.steps"] == 10 and "branch_of" not in rows[stable.slug]
    # the model's own FLOPs (as the trainer's MFU counts them) beside 6ND
    fpt = train_flops_per_token(stable.cfg.model.name, stable.cfg.model.config, 64, 32)
    assert rows[long.slug]["C_model"] == pytest.approx(fpt * 10 * 256)


@pytest.mark.parametrize("body, message", [
    (BRANCHED.replace("train.schedule: wsd, train.steps: 12, train.decay_steps: 2", "train.steps: 12"),
     "train.schedule is cosine; decay branches continue"),
    (BRANCHED.replace("checkpoint.keep_every: 4", "checkpoint.keep_every: 0"),
     r"no kept checkpoint at step 4, .*set both to a divisor of every branch point \[4, 8\], e.g. 4"),
    (BRANCHED.replace("steps: [6, 10]", "steps: [6, 14]"), r"its decay starts at step 12, outside the stable phase \[2, 10\]"),
    (BRANCHED + "  set: {model.d_model: 32}\n", r"branch .*: model differs from"),
    (BRANCHED.replace("decay_steps: 2\n", "decay_steps: 2\n      decay_fraction: 0.2\n"),
     "give one of decay_fraction .* or decay_steps"),
    (BRANCHED.replace("steps: [6, 10]", "steps: 6"), r"branches\.steps: expected a non-empty list"),
])
def test_bad_branches_say_what_to_change(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep(tmp_path, body))


def test_named_members_and_their_own_base_configs(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, f"""\
        list:
          - {{name: qs_a}}
          - {{name: c32, config: {REPO}/configs/mqar_psm_c32.yaml, model.chunk_size: 8}}
          - {{config: {REPO}/configs/mqar_psm_c32.yaml, model.chunk_size: 8}}
        """))
    a, b, c = sweep.members
    assert (a.slug, a.cfg.name, a.cfg.model.config.chunk_size) == ("qs_a", "qs_a", 8)
    assert (b.slug, b.cfg.data.config.num_kv_pairs, b.cfg.run_dir) == ("c32", 8, str(tmp_path / "out" / "c32"))
    assert c.slug == "config=mqar_psm_c32,chunk_size=8" and c.cfg.name == f"sweep-{c.slug}"
    with pytest.raises(ConfigError, match="member name 'a/b'"):
        load_sweep(_sweep(tmp_path, "list: [{name: a/b}]\n"))


def test_local_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="local.cores: unknown field"):
        load_sweep(_sweep(tmp_path, "local: {cores: 2}\n"))
    with pytest.raises(ConfigError, match="per_gpu > 1 packs members onto one GPU"):
        load_sweep(_sweep(tmp_path, "local: {per_gpu: 2, gpus_per_member: 2}\n"))


def test_packing_onto_gpus():
    from psm_train.launch.local import Packer

    p = Packer(["0", "1"], LocalOptions(per_gpu=2))
    taken = [p.take() for _ in range(5)]
    assert taken == [("0",), ("1",), ("0",), ("1",), None]  # the emptiest GPU first, 2 members per GPU
    p.give(("1",))
    assert p.take() == ("1",)
    wide = Packer(["0", "1", "2"], LocalOptions(gpus_per_member=2))
    assert wide.take() == ("0", "1") and wide.take() is None
    assert Packer([], LocalOptions(max_parallel=3)).limit == 3 and Packer(["0"], LocalOptions(max_parallel=3)).limit == 1
