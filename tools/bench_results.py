"""Run the results experiments (docs/results.md) as many `psm-train train` processes on one GPU.

    python tools/bench_results.py configs/results/plan_s5.yaml configs/results/plan_mqar.yaml \
        --out-dir runs/results --budget-s 360 --pack results.tar.gz

Small models are launch-bound on a GPU, so the runs of every plan given run at the same time,
one process each. Two phases:
1. probe: every run trains ``--probe-steps`` steps (with the plan's ``probe_set`` overrides, e.g.
   the longest S5 length) and its rate is read from the elapsed time between its last two
   metrics.jsonl records (the first half of the probe, with compilation and start-up, is left
   out);
2. train: every run of a plan gets the same number of steps, the plan's slowest probe rate times
   ``--budget-s`` times ``--safety``, rounded down to ``steps.round`` and clipped to
   [steps.min, steps.max]; fields listed under ``scale`` are set proportionally to the steps
   (e.g. the S5 curriculum over the first quarter); evaluation runs ``eval_points`` times.

``--sequential`` (a CPU with few cores) probes and trains the runs one after another instead;
``--budget-s`` is then the wall time of all runs of a plan together, so every run of a plan gets
``--budget-s`` × ``--safety`` / Σ(1 / probe rate) steps. ``--steps N`` skips the probe and
trains every run N steps. A run still going after ``--budget-s`` × ``--kill-after`` gets SIGTERM,
saves a checkpoint at its next logged step and exits ("stopped"; killed if it takes over a
minute). With ``--only``, the entries of the other runs already in ``--out-dir``/summary.json are
kept, so runs can be added to one directory call by call. ``--resume`` (with the same ``--steps``)
continues every run whose directory holds a checkpoint, appending to its log.txt, and leaves
finished runs (final.pt) as they are, so one run can span several calls of a time-limited machine.

``--mps auto`` probes twice, without and then with an MPS daemon (kernels of different processes
then share the GPU instead of taking turns), and trains in the mode whose summed probe rate is
higher by 10% or more; ``on`` always uses MPS when the daemon starts.

A plan (YAML):

    group: s5
    steps: {min: 500, max: 20000, round: 100}
    eval_points: 5
    scale: {data.curriculum_steps: 0.25}
    probe_set: [data.min_len=18]
    set: [train.threads=1]                     # every run of the plan
    runs:
      - {name: s5_psm_c1_s0, config: configs/results/s5_psm_c1.yaml, set: [train.seed=0]}

Each run's directory under --out-dir holds psm-train's config.yaml (resolved), metrics.jsonl,
eval.json and log.txt; summary.json records the probe rates, steps, wall times and exit codes.
``--pack`` writes all of it (checkpoints left out) into one .tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml


GLOBAL_SET: list[str] = []  # --set: applied to every run, after everything else
CHILDREN: list[subprocess.Popen] = []


def load_plan(path: str) -> dict:
    plan = yaml.safe_load(Path(path).read_text())
    plan.setdefault("steps", {})
    plan["steps"] = {"min": 200, "max": 100000, "round": 100, **plan["steps"]}
    plan.setdefault("eval_points", 5)
    plan.setdefault("scale", {})
    plan.setdefault("probe_set", [])
    plan.setdefault("set", [])
    plan["source"] = path
    for run in plan["runs"]:
        run.setdefault("set", [])
    return plan


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


def launch(run: dict, plan: dict, run_dir: Path, extra: list[str], env: dict, resume: bool = False) -> subprocess.Popen:
    """Start one run; with ``resume`` (its directory holds a checkpoint) the directory is kept and the trainer
    continues the run, else the directory is started afresh."""
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "psm_train", "train", run["config"], "--run-dir", str(run_dir)]
    for item in [*plan["set"], *run["set"], *extra, *GLOBAL_SET]:
        cmd += ["--set", item]
    (run_dir / "command.txt").write_text(" ".join(cmd[2:]) + "\n")
    log = (run_dir / "log.txt").open("a" if resume else "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    CHILDREN.append(proc)
    return proc


def wait_all(procs: dict[str, tuple[subprocess.Popen, float]], limit_s: float, grace_s: float = 60) -> dict[str, dict]:
    """Wait for every process. One still running ``limit_s`` after its start gets SIGTERM (psm-train then
    checkpoints at its next logged step and exits 143: "stopped"); ``grace_s`` later it is killed
    ("killed"). Processes are signalled by their own pid."""
    out, termed = {}, {}
    while procs:
        for name, (proc, started) in list(procs.items()):
            rc = proc.poll()
            now = time.time()
            if rc is None and now - started > limit_s and name not in termed:
                proc.terminate()
                termed[name] = now
            elif rc is None and name in termed and now - termed[name] > grace_s:
                proc.kill()
                proc.wait()
                rc = "killed"
            if rc is not None:
                out[name] = dict(returncode="stopped" if name in termed and rc == 143 else rc, wall_s=now - started)
                del procs[name]
        time.sleep(0.5)
    return out


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_rate(run_dir: Path) -> float | None:
    """Steps per second between the last two logged records."""
    recs = [r for r in read_records(run_dir) if "elapsed_s" in r]
    if len(recs) < 2:
        return None
    a, b = recs[-2], recs[-1]
    return (b["step"] - a["step"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)


def mps_control() -> str | None:
    return shutil.which("nvidia-cuda-mps-control") or shutil.which("nvidia-cuda-mps-control", path="/usr/local/nvidia/bin:/usr/bin")


def start_mps(env: dict) -> str:
    """Start an MPS control daemon for the children; returns a status line."""
    exe = mps_control()
    if exe is None:
        return "mps: nvidia-cuda-mps-control not found"
    for key, sub in (("CUDA_MPS_PIPE_DIRECTORY", "/tmp/mps-pipe"), ("CUDA_MPS_LOG_DIRECTORY", "/tmp/mps-log")):
        os.makedirs(sub, exist_ok=True)
        env[key] = sub
    r = subprocess.run([exe, "-d"], env=env, capture_output=True, text=True)
    return f"mps: started (rc {r.returncode}) {r.stdout.strip()} {r.stderr.strip()}".strip()


def stop_mps(env: dict) -> None:
    exe = mps_control()
    if exe and "CUDA_MPS_PIPE_DIRECTORY" in env:
        subprocess.run([exe], input="quit\n", env=env, text=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--out-dir", default="runs/results")
    ap.add_argument("--budget-s", type=float, default=300.0, help="training wall time to size the runs for")
    ap.add_argument("--safety", type=float, default=0.8, help="fraction of the budget the probed rate is trusted for")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--probe-only", action="store_true", help="measure the rates and stop")
    ap.add_argument("--kill-after", type=float, default=1.5, help="stop a training run after this × budget")
    ap.add_argument("--mps", choices=["off", "on", "auto"], default="off",
                    help="run the processes under an MPS daemon (started and stopped here); auto: probe without and "
                         "with it and train in the faster mode")
    ap.add_argument("--only", nargs="*", help="run names to run (default all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, last (e.g. train.device=cpu for a dry run)")
    ap.add_argument("--pack", help="write the run directories (no checkpoints) into this .tar.gz")
    ap.add_argument("--sequential", action="store_true",
                    help="probe and train one run at a time (CPU); --budget-s is then the total of a plan's runs")
    ap.add_argument("--steps", type=int, help="train every run this many steps, without a probe")
    ap.add_argument("--resume", action="store_true",
                    help="continue the runs whose directories hold a checkpoint (needs --steps: the same as before)")
    args = ap.parse_args()
    if args.resume and not args.steps:
        ap.error("--resume needs --steps: a probe would choose another step count than the runs were started with")

    GLOBAL_SET.extend(args.overrides)
    # `timeout` sends SIGTERM: leave through the finally below (stop MPS, write summary, pack).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plans = [load_plan(p) for p in args.plans]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    summary: dict = dict(args=vars(args), started=time.strftime("%Y-%m-%d %H:%M:%S"), runs={})
    runs = [(plan, run) for plan in plans for run in plan["runs"] if not args.only or run["name"] in args.only]
    if args.resume:  # the trainer refuses to restart a finished run
        finished = {run["name"] for _, run in runs if (out_dir / run["name"] / "final.pt").is_file()}
        for name in sorted(finished):
            print(f"{name}: finished already (final.pt), kept as it is", flush=True)
        runs = [(plan, run) for plan, run in runs if run["name"] not in finished]
    if (args.only or args.resume) and (out_dir / "summary.json").is_file():  # keep the runs not started here
        previous = json.loads((out_dir / "summary.json").read_text())
        started = {run["name"] for _, run in runs}
        summary["runs"] = {k: v for k, v in previous.get("runs", {}).items() if k not in started}

    def run_all(procs: dict[str, Callable[[], subprocess.Popen]], limit_s: float) -> dict[str, dict]:
        """Start the processes of ``procs`` (name -> function that starts one) at once, or one after
        another with --sequential."""
        if not args.sequential:
            return wait_all({name: (start(), time.time()) for name, start in procs.items()}, limit_s)
        out = {}
        for name, start in procs.items():
            out.update(wait_all({name: (start(), time.time())}, limit_s))
        return out

    def save():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    def probe(tag: str, limit_s: float = 180) -> dict[str, float | None]:
        t0 = time.time()
        procs = {}
        half = max(1, args.probe_steps // 2)
        for plan, run in runs:
            extra = [f"train.steps={args.probe_steps}", f"train.log_every={half}", "train.eval_every=0",
                     "train.eval_batches=1", "train.warmup_steps=1", *plan["probe_set"]]
            procs[run["name"]] = (lambda run=run, plan=plan, extra=extra:
                                  launch(run, plan, out_dir / f"probe_{tag}" / run["name"], extra, env))
        done = run_all(procs, limit_s=limit_s)
        rates = {}
        for plan, run in runs:
            rate = rates[run["name"]] = probe_rate(out_dir / f"probe_{tag}" / run["name"])
            info = summary["runs"].setdefault(run["name"], dict(group=plan["group"], config=run["config"]))
            info[f"probe_rate_{tag}"] = rate
            info[f"probe_returncode_{tag}"] = done[run["name"]]["returncode"]
            print(f"probe {tag} {run['name']}: {rate and round(rate, 2)} steps/s (rc {done[run['name']]['returncode']})", flush=True)
        summary[f"probe_{tag}_s"] = time.time() - t0
        save()
        return rates

    try:
        # 1. probe (with --mps auto: without and with MPS, keeping the faster)
        mps_on = False
        if args.steps:
            rates = {run["name"]: None for _, run in runs}
            for plan, run in runs:
                summary["runs"][run["name"]] = dict(group=plan["group"], config=run["config"])
        elif args.mps in ("on", "auto"):
            rates = probe("plain") if args.mps == "auto" else None
            summary["mps"] = start_mps(env)
            print(summary["mps"], flush=True)
            mps_on = summary["mps"].startswith("mps: started (rc 0)")
            if mps_on:
                rates_mps = probe("mps", limit_s=100)
                total = lambda r: sum(v for v in r.values() if v)  # noqa: E731
                if rates is not None and total(rates_mps) < 1.1 * total(rates):
                    stop_mps(env)
                    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
                    mps_on = False
                else:
                    rates = rates_mps
            if rates is None:
                rates = probe("plain")
            summary["mps_used"] = mps_on
            print(f"training with MPS: {mps_on}", flush=True)
        else:
            rates = probe("plain")
        for name, rate in rates.items():
            summary["runs"][name]["probe_rate"] = rate
        save()
        if args.probe_only:
            return

        # 2. train
        for plan in plans:
            if args.steps:
                plan["chosen_steps"] = args.steps
                print(f"group {plan['group']}: {args.steps} steps (--steps)", flush=True)
                continue
            rates = [summary["runs"][r["name"]]["probe_rate"] for _, r in runs if r in plan["runs"]]
            rates = [r for r in rates if r]
            if not rates:
                continue
            lim = plan["steps"]
            # concurrent runs: the slowest sets the pace; sequential runs: the steps of all add up
            rate = 1 / sum(1 / r for r in rates) if args.sequential else min(rates)
            steps = int(rate * args.budget_s * args.safety) // lim["round"] * lim["round"]
            plan["chosen_steps"] = max(lim["min"], min(lim["max"], steps))
            print(f"group {plan['group']}: {plan['chosen_steps']} steps ({'summed' if args.sequential else 'slowest'} "
                  f"probe rate {rate:.2f} steps/s)", flush=True)
        t0 = time.time()
        procs = {}
        for plan, run in runs:
            info = summary["runs"][run["name"]]
            if "chosen_steps" not in plan or not (info["probe_rate"] or args.steps):
                info["skipped"] = "probe failed"
                continue
            steps = plan["chosen_steps"]
            extra = [f"train.steps={steps}", f"train.eval_every={max(1, steps // plan['eval_points'])}",
                     f"train.log_every={max(1, steps // 50)}"]
            extra += [f"{key}={max(1, int(frac * steps))}" for key, frac in plan["scale"].items()]
            info.update(steps=steps, overrides=[*plan["set"], *run["set"], *extra, *GLOBAL_SET])
            info["resumed"] = args.resume and has_checkpoint(out_dir / run["name"])
            procs[run["name"]] = (lambda run=run, plan=plan, extra=extra, resume=info["resumed"]:
                                  launch(run, plan, out_dir / run["name"], extra, env, resume=resume))
        save()
        done = run_all(procs, limit_s=args.budget_s * args.kill_after)
        summary["train_s"] = time.time() - t0
        for name, res in done.items():
            info = summary["runs"][name]
            info.update(res)
            ev = out_dir / name / "eval.json"
            if ev.is_file():
                info["final"] = {k: {m: v[m] for m in ("loss", "ppl", "acc", "scored")} for k, v in json.loads(ev.read_text()).items()}
            print(f"{name}: rc {res['returncode']} in {res['wall_s']:.0f}s "
                  f"{json.dumps(info.get('final', {}))}", flush=True)
        save()
    finally:
        for proc in CHILDREN:  # only processes started here, by their own pid
            if proc.poll() is None:
                proc.kill()
        stop_mps(env)
        save()
        if args.pack:
            with tarfile.open(args.pack, "w:gz") as tar:
                tar.add(out_dir, arcname=out_dir.name, filter=lambda ti: None if ti.name.endswith(".pt") else ti)
            print(f"packed {args.pack} ({os.path.getsize(args.pack) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
