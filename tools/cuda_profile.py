"""CUDA time per kernel of a step function, from torch.profiler (used by the profiling tools)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_times(step: Callable[[], None], steps: int) -> tuple[list[dict], float]:
    """Profile ``steps`` calls of ``step`` (warmed up by the caller). Returns one row per kernel,
    {kernel (full name), calls_per_pass, ms_per_pass}, largest first, and the total ms of CUDA time per pass."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us > 0:
            rows.append({"kernel": e.key, "calls_per_pass": e.count / steps, "ms_per_pass": us / 1e3 / steps})
    rows.sort(key=lambda r: -r["ms_per_pass"])
    return rows, sum(r["ms_per_pass"] for r in rows)


def print_kernel_table(rows: list[dict], total: float, top: int | None = None) -> None:
    print("| kernel | calls per pass | ms per pass | share |\n|---|---|---|---|")
    for r in rows[:top]:
        print(f"| {r['kernel'][:90]} | {r['calls_per_pass']:g} | {r['ms_per_pass']:.3f} | {100 * r['ms_per_pass'] / total:.0f}% |")


def autotune_rows(module) -> list[dict]:
    """Every Triton autotuner in ``module`` that has tuned in this process: its configs, fastest
    first, as {kernel, config, ms} (the autotuner's own median timings, of the last key it tuned)."""
    rows = []
    for name in sorted(vars(module)):
        timings = getattr(getattr(module, name), "configs_timings", None) or {}
        ranked = sorted((t[0] if isinstance(t, (list, tuple)) else t, str(c)) for c, t in timings.items())
        rows += [{"kernel": name, "config": c, "ms": ms} for ms, c in ranked]
    return rows


def print_autotune_table(rows: list[dict], top: int = 3) -> None:
    """The ``top`` fastest configs of each kernel and how many it tried."""
    print("| kernel | configs tried | rank | config | µs |\n|---|---|---|---|---|")
    for name in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == name]
        for i, r in enumerate(mine[:top]):
            print(f"| {name} | {len(mine)} | {i + 1} | {r['config']} | {1e3 * r['ms']:.0f} |")
