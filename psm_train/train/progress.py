"""The console line of a training run: loss, speed, memory, model FLOP utilisation, time left."""

from __future__ import annotations

import time

import torch

from psm_train.train.flops import mfu


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Elapsed time and ETA from the steps this process ran (a resumed run counts from its start)."""

    def __init__(self, start_step: int, total_steps: int, device: torch.device, flops_per_token: float | None,
                 peak_flops: float | None):
        self.start_step, self.total = start_step, total_steps
        self.device = device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def measures(self, tokens_per_s: float) -> dict[str, float]:
        """What a metrics record gets besides the loss: peak GPU memory and MFU where they apply."""
        out = {}
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak_flops)
        return out

    def line(self, step: int, record: dict) -> str:
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "mfu" in record:
            parts.append(f"MFU {record['mfu']:.1%}")
        if "peak_mem_gib" in record:
            parts.append(f"mem {record['peak_mem_gib']:.1f} GiB")
        done = step - self.start_step
        left = self.elapsed() / done * (self.total - step) if done else 0.0
        parts.append(f"{duration(self.elapsed())} elapsed, {duration(left)} left")
        return " ".join(parts)
