"""``psm-train submit``, ``psm-train jobs`` and ``psm-train sweep``: parsers and handlers."""

from __future__ import annotations

import argparse
import dataclasses
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


def _wait_local(jobs_by_dir: dict[Path, object]) -> None:
    """Wait for local jobs; fail with the log tails of those that failed."""
    from submitit.core.utils import UncompletedJobError

    from psm_train.launch.jobs import report

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
    from psm_train.launch.job import TrainJob
    from psm_train.launch.jobs import active_jobs
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


def _misplaced(args: argparse.Namespace, scaling: dict[str, list[argparse.Action]], action: str) -> str:
    """The first option given that the chosen sweep action does not take ('' when none)."""
    for other, actions in scaling.items():
        for a in actions:
            if other != action and getattr(args, a.dest) is not None:
                return f"{a.option_strings[0]} belongs to `psm-train sweep {other}`"
    if action in scaling:
        given = [f.name for f in dataclasses.fields(Resources) if getattr(args, f.name, None) is not None]
        if given or args.dry_run:
            return f"--{(given or ['dry_run'])[0].replace('_', '-')} applies to submitting a sweep, not to {action}"
    return ""


def cmd_sweep(args: argparse.Namespace, scaling: dict[str, list[argparse.Action]]) -> None:
    action = args.sweep if args.sweep in scaling else "submit"
    wrong = _misplaced(args, scaling, action)
    if action != "submit" and args.path is None:
        wrong = f"`psm-train sweep {action}` needs a {'CSV file' if action == 'fit' else 'sweep file'}"
    elif action == "submit" and args.path is not None:
        wrong = f"unexpected {args.path!r}: submitting takes one sweep file (or: collect SWEEP.yaml, fit RESULTS.csv)"
    if wrong:
        raise SystemExit(f"error: {wrong}")
    {"collect": cmd_sweep_collect, "fit": cmd_sweep_fit, "submit": cmd_sweep_submit}[action](args)


def cmd_sweep_collect(args: argparse.Namespace) -> None:
    from psm_train.launch.scaling import ScalingError, collect, write_csv

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
    from psm_train.launch.scaling import ScalingError, fit_csv

    try:
        fit_csv(args.path, args.out_dir or Path(args.path).parent,
                200 if args.bootstrap is None else args.bootstrap, args.seed or 0)
    except ScalingError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_sweep_submit(args: argparse.Namespace) -> None:
    from psm_train.launch.job import TrainJob
    from psm_train.launch.submit import free_port, sbatch_script, submit_array, submit_one
    from psm_train.launch.sweep import load_sweep, member_status

    sweep = load_sweep(args.sweep)  # every member's config is validated here
    try:
        res = _resources(args, sweep.resources)
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    status = member_status(sweep.members)
    todo = [m for m in sweep.members if status[m.slug] in ("new", "resume")]
    print(f"sweep {sweep.name}: {len(sweep.members)} members in {sweep.out_dir}")
    for m in sweep.members:
        print(f"  {m.slug}: {status[m.slug]}" + (" -> submit" if m in todo else " -> skip"))
    if not todo:
        print("nothing to submit")
        return
    if args.dry_run:
        if args.executor == "slurm":
            print(sbatch_script(res, f"psm-sweep-{sweep.name}", sweep.out_dir / "logs", array_size=len(todo)))
        return
    local = args.executor == "local"
    fns = [TrainJob(m.cfg.to_dict(), args.retries, args.max_requeues, free_port() if local else 0) for m in todo]
    dirs = [Path(m.cfg.run_dir) for m in todo]
    try:
        if not local:
            jobs = submit_array(fns, dirs, sweep.out_dir / "logs", "slurm", res, f"psm-sweep-{sweep.name}")
            print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} members, "
                  f"at most {res.array_parallelism} at once)")
            for m, job in zip(todo, jobs):
                print(f"  {m.slug}: job {job.job_id}")
            print(f"status: psm-train jobs {sweep.out_dir}")
            return
        # local: at most array_parallelism members at once, waited for
        running: dict[Path, object] = {}
        for fn, run_dir, m in zip(fns, dirs, todo):
            while sum(not j.done() for j in running.values()) >= res.array_parallelism:
                time.sleep(1)
            running[run_dir] = submit_one(fn, run_dir, "local", res, f"psm-{m.slug}")
            print(f"  {m.slug}: local job {running[run_dir].job_id}")
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    _wait_local(running)
    print(f"sweep {sweep.name}: {len(running)} member(s) finished")


SWEEP_USAGE = """psm-train sweep SWEEP.yaml [resources]   submit the members not finished, queued or running
       psm-train sweep collect SWEEP.yaml [--out CSV] [--metric KEY]
       psm-train sweep fit RESULTS.csv [--out-dir DIR] [--bootstrap N] [--seed S]"""


def _add_scaling(p: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """collect's and fit's options; defaults are None so that misplaced ones can be told apart."""
    g = p.add_argument_group("collect: final metrics of the finished members into a CSV (psm_train/launch/scaling.py)")
    collect = [
        g.add_argument("--out", help="the CSV (default <sweep out_dir>/scaling.csv)"),
        g.add_argument("--metric", help="the loss to fit, a key of summary.json's eval or train_loss "
                                        "(default: the eval loss at the shortest length every member has)"),
    ]
    g = p.add_argument_group("fit: L(N, D) = E + A/N^alpha + B/D^beta per model family, frontier, plots")
    fit = [
        g.add_argument("--out-dir", help="fit.json and the PNG plots (default: the CSV's directory)"),
        g.add_argument("--bootstrap", type=int, help="resamples for the uncertainty (default 200; 0: none)"),
        g.add_argument("--seed", type=int, help="the bootstrap's seed (default 0)"),
    ]
    return {"collect": collect, "fit": fit}


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

    p = sub.add_parser("sweep", usage=SWEEP_USAGE,
                       help="submit a sweep file as one job array (finished members are skipped); "
                            "collect its results and fit scaling laws")
    p.add_argument("sweep", metavar="SWEEP.yaml | collect | fit",
                   help="a sweep YAML to submit (see psm_train/launch/sweep.py), or the action collect or fit")
    p.add_argument("path", nargs="?", metavar="FILE", help="collect: the sweep YAML; fit: the CSV collect wrote")
    _add_resources(p)
    scaling = _add_scaling(p)
    p.set_defaults(func=lambda args: cmd_sweep(args, scaling))
