"""``psm-train submit``, ``psm-train jobs`` and ``psm-train sweep``: parsers and handlers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from psm_train.launch.submit import EXECUTORS, Resources, SubmissionError


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (sbatch parameters)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    g.add_argument("--tasks-per-node", type=int, help="CPU processes per node when there are no GPUs (default 1)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint", help="node features, SLURM syntax")
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--exclusive", action="store_true", default=None, help="whole nodes only")
    g.add_argument("--signal-delay", dest="signal_delay_s", type=int,
                   help="seconds between SIGUSR2 (save and requeue) and the time limit (default 120)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm",
                   help="slurm: sbatch through submitit; local: the same job on this machine, waited for")
    p.add_argument("--retries", type=int, default=1, help="requeues after a failure (default 1)")
    p.add_argument("--max-requeues", type=int, default=20, help="requeues after preemption or time limit (default 20)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved sbatch parameters; submit nothing")


def _resources(args: argparse.Namespace, base: Resources) -> Resources:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Resources)
             if getattr(args, f.name, None) is not None}
    res = dataclasses.replace(base, **given)
    res.validate()
    return res


def _print_logs(job, tasks: int) -> None:
    from psm_train.launch.submit import log_paths

    out, err = log_paths(job.paths.folder, job.job_id, 1)[0]
    print(f"logs:    {out}\n         {err}" + (f"\n         (tasks 1..{tasks - 1}: same names with _<task>_)" if tasks > 1 else ""))


def _last_logged(run_dir: Path) -> str | None:
    """'step N loss L' of the newest complete record with a loss in run_dir/metrics.jsonl, if any."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "loss" in record:
            return f"step {record['step']} loss {record['loss']:.4f}"
    return None


def _wait_local(jobs_by_dir: dict[Path, object]) -> None:
    """Wait for local jobs; fail with the log tails of those that failed."""
    from submitit.core.utils import UncompletedJobError

    from psm_train.launch.jobs import report

    shown: dict[Path, str] = {}
    while not all(job.done() for job in jobs_by_dir.values()):  # a line whenever a run logs a new step
        for run_dir in jobs_by_dir:
            line = _last_logged(run_dir)
            if line and line != shown.get(run_dir):
                print(f"{run_dir.name}: {line}", flush=True)
                shown[run_dir] = line
        time.sleep(2)
    failed = []
    for run_dir, job in jobs_by_dir.items():
        try:
            if job.exception() is not None:  # waits for the job
                failed.append(run_dir)
        except UncompletedJobError:  # ended without a result (killed, or stopped by a signal)
            failed.append(run_dir)
    if failed:
        for run_dir in failed:
            print(report(run_dir))
        raise SystemExit(f"error: {len(failed)} local job(s) failed: {', '.join(map(str, failed))}")


def cmd_submit(args: argparse.Namespace) -> None:
    from psm_train.config import load_config
    from psm_train.launch.jobs import active_jobs
    from psm_train.launch.task import TrainJob
    from psm_train.launch.submit import free_port, sbatch_script, submit_one

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)  # config errors stop here, before anything is submitted
    run_dir = Path(cfg.run_dir).absolute()
    cfg.run_dir = str(run_dir)
    try:
        res = _resources(args, Resources())
        if (run_dir / "final.pt").exists():
            raise SubmissionError(f"{run_dir} already holds a finished run (final.pt); choose another --run-dir")
        active = active_jobs([run_dir])
        if active:  # two jobs training into one run directory would overwrite each other's checkpoints
            raise SubmissionError(f"{run_dir} has job {active[run_dir]} queued or running; "
                                  f"see `psm-train jobs {run_dir}`, or scancel it first")
        job_name = f"psm-{cfg.name}"
        if args.dry_run:
            print(f"run dir: {run_dir}\ntasks:   {res.tasks} ({res.nodes} node(s) x {res.tasks // res.nodes})")
            if args.executor == "slurm":
                print(sbatch_script(res, job_name, run_dir / "logs"))
            return
        fn = TrainJob(cfg.to_dict(), args.retries, args.max_requeues, free_port() if args.executor == "local" else 0)
        job = submit_one(fn, run_dir, args.executor, res, job_name)
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"submitted job {job.job_id} ({args.executor}, {res.tasks} task(s)) for {cfg.name}")
    print(f"run dir: {run_dir}")
    _print_logs(job, res.tasks)
    print(f"status:  psm-train jobs {run_dir}")
    if args.executor == "local":
        _wait_local({run_dir: job})
        print(f"job {job.job_id} finished")


def cmd_jobs(args: argparse.Namespace) -> None:
    from psm_train.launch.jobs import report

    path = Path(args.path)
    if path.is_file():  # a sweep file: its output directory
        from psm_train.launch.sweep import load_sweep

        path = load_sweep(path).out_dir
    print(report(path, args.tail))


def cmd_sweep_collect(args: argparse.Namespace) -> None:
    from psm_train.analysis.scaling import ScalingError, write_csv
    from psm_train.launch.collect import collect

    try:
        got = collect(args.path, args.metric)
    except ScalingError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out) if args.out else got.out_dir / "scaling.csv"
    wm, wf = (max(len(h), *(len(str(r[h])) for r in got.rows)) for h in ("member", "family"))
    print(f"{'member':<{wm}} {'family':<{wf}} {'N':>10} {'D':>12} {'loss':>8}")
    for r in got.rows:
        print(f"{r['member']:<{wm}} {r['family']:<{wf}} {r['N']:>10} {r['D']:>12} {r['loss']:>8.4f}")
    if got.unfinished:
        print(f"{len(got.unfinished)} unfinished (not in the CSV):")
        print("\n".join(f"  {u}" for u in got.unfinished))
    write_csv(got.rows, out)
    print(f"wrote {len(got.rows)} rows ({got.metric}) to {out}\nnext: psm-train sweep fit {out}")


def cmd_sweep_fit(args: argparse.Namespace) -> None:
    from psm_train.analysis.scaling import ScalingError, fit_csv

    try:
        fit_csv(args.path, args.out_dir or Path(args.path).parent,
                200 if args.bootstrap is None else args.bootstrap, args.seed or 0, args.n_column, args.reference)
    except ScalingError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_sweep_submit(args: argparse.Namespace) -> None:
    from psm_train.launch.branch import start_branch
    from psm_train.launch.submit import sbatch_script, submit_array
    from psm_train.launch.sweep import load_sweep, member_status
    from psm_train.launch.task import TrainJob

    sweep = load_sweep(args.sweep)  # every member's config is validated here
    local = args.executor == "local"
    given = [a for a in LOCAL_OPTIONS if getattr(args, a) is not None]
    if given and not local:
        raise SystemExit(f"error: --{given[0].replace('_', '-')} applies to --executor local")
    try:
        res = _resources(args, sweep.resources)
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    status = member_status(sweep)
    todo = [m for m in sweep.members if status[m.slug] in ("new", "resume") or (local and status[m.slug] == "waiting")]
    print(f"sweep {sweep.name}: {len(sweep.members)} members in {sweep.out_dir}")
    for m in sweep.members:
        print(f"  {m.slug}: {status[m.slug]}" + (" -> submit" if m in todo else " -> skip"))
    if not todo:
        print("nothing to submit")
        return
    if local:
        _sweep_local(args, sweep, todo)
        return
    if args.dry_run:
        print(sbatch_script(res, f"psm-sweep-{sweep.name}", sweep.out_dir / "logs", array_size=len(todo)))
        return
    for m in todo:
        start_branch(sweep, m)  # a branch's run directory starts with its stable run's checkpoint
    fns = [TrainJob(m.cfg.to_dict(), args.retries, args.max_requeues, 0) for m in todo]
    dirs = [Path(m.cfg.run_dir) for m in todo]
    try:
        jobs = submit_array(fns, dirs, sweep.out_dir / "logs", "slurm", res, f"psm-sweep-{sweep.name}")
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} members, "
          f"at most {res.array_parallelism} at once)")
    for m, job in zip(todo, jobs):
        print(f"  {m.slug}: job {job.job_id}")
    if any(v == "waiting" for v in status.values()):
        print("branches marked waiting start once their stable run has saved the branch point: "
              "submit the sweep again then")
    print(f"status: psm-train jobs {sweep.out_dir}")


LOCAL_OPTIONS = ("max_parallel", "per_gpu", "gpus_per_member", "budget", "refresh")


def _sweep_local(args: argparse.Namespace, sweep, todo) -> None:
    from psm_train.launch.local import Packer, run_local, summary_lines, visible_gpus

    given = {k: getattr(args, k) for k in ("max_parallel", "per_gpu", "gpus_per_member") if getattr(args, k) is not None}
    opts = dataclasses.replace(sweep.local, **given)
    try:
        opts.validate()
        packer = Packer(visible_gpus(), opts)
        if args.dry_run:
            print(f"would run {len(todo)} member(s) here: {packer.where()}")
            return
        print(f"running {len(todo)} member(s) here: {packer.where()}" +
              (f"; budget {args.budget:g} s" if args.budget else ""), flush=True)
        runs = run_local(sweep, todo, opts, budget_s=args.budget or 0, refresh_s=args.refresh or 5)
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    for line in summary_lines(sweep, runs):
        print(line)
    failed = [r for r in runs if r.state == "failed"]
    if failed:
        raise SystemExit(f"error: {len(failed)} member(s) failed (`psm-train jobs {sweep.out_dir}` shows their logs)")
    print(f"sweep {sweep.name}: {sum(r.state == 'done' for r in runs)} member(s) finished")


def sweep_shorthand(argv: list[str]) -> list[str]:
    """``psm-train sweep SWEEP.yaml ...`` is short for ``psm-train sweep submit SWEEP.yaml ...``."""
    if len(argv) > 1 and argv[0] == "sweep" and argv[1] not in ("submit", "collect", "fit", "-h", "--help"):
        return ["sweep", "submit", *argv[1:]]
    return argv


def add_commands(sub: argparse._SubParsersAction, add_overrides) -> None:
    """Register submit, jobs and sweep on the psm-train parser."""
    p = sub.add_parser("submit", help="submit a training job to SLURM (or run it locally through submitit)")
    p.add_argument("config")
    p.add_argument("--run-dir", help="the run directory (default runs/<name>); logs go to <run dir>/logs")
    add_overrides(p)
    _add_resources(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="jobs of a run or a sweep: states, last step and loss, logs, failures")
    p.add_argument("path", help="a run directory, a sweep directory or a sweep file")
    p.add_argument("--tail", type=int, default=15, help="log lines shown per failing rank")
    p.set_defaults(func=cmd_jobs)

    sweep = sub.add_parser("sweep", help="submit a sweep file (finished members are skipped); collect its results and "
                                         "fit scaling laws", description="psm-train sweep SWEEP.yaml is short for "
                                         "psm-train sweep submit SWEEP.yaml").add_subparsers(dest="sweep_action", required=True)
    p = sweep.add_parser("submit", help="submit the members not finished, queued or running, as one job array "
                                        "(or run them here with --executor local)")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (see psm_train/launch/sweep.py)")
    _add_resources(p)
    g = p.add_argument_group("--executor local: members as processes on this machine (psm_train/launch/local.py)")
    g.add_argument("--max-parallel", type=int, help="members at once (default: per-gpu x GPUs; 1 without GPUs)")
    g.add_argument("--per-gpu", type=int, help="members sharing one GPU (default 1, or the sweep's local.per_gpu)")
    g.add_argument("--gpus-per-member", type=int, help="whole GPUs per member, one rank each (default 1)")
    g.add_argument("--budget", type=float, help="seconds; then running members checkpoint and stop (SIGTERM)")
    g.add_argument("--refresh", type=float, help="seconds between redraws of the member table (default 5)")
    p.set_defaults(func=cmd_sweep_submit)

    p = sweep.add_parser("collect", help="final metrics of the finished members into a CSV (psm_train/launch/collect.py)")
    p.add_argument("path", metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--out", help="the CSV (default <sweep out_dir>/scaling.csv)")
    p.add_argument("--metric", help="the loss to fit, a key of summary.json's eval or train_loss "
                                    "(default: the eval loss at the shortest length every member has)")
    p.set_defaults(func=cmd_sweep_collect)

    p = sweep.add_parser("fit", help="L(N, D) = E + A/N^alpha + B/D^beta per model family, frontier, plots")
    p.add_argument("path", metavar="RESULTS.csv", help="the CSV `psm-train sweep collect` wrote")
    p.add_argument("--out-dir", help="fit.json and the PNG plots (default: the CSV's directory)")
    p.add_argument("--bootstrap", type=int, help="resamples for the uncertainty (default 200; 0: none)")
    p.add_argument("--seed", type=int, help="the bootstrap's seed (default 0)")
    p.add_argument("--n-column", choices=("N", "N_non_embedding"), default="N",
                   help="the CSV column fitted as N: all parameters (default) or those outside the embeddings")
    p.add_argument("--reference", default="transformer",
                   help="the family the others' compute-optimal loss is divided by (default transformer)")
    p.set_defaults(func=cmd_sweep_fit)
