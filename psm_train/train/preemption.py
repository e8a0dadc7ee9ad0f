"""The signal side of preemption: a handler that only sets a flag, and a collective check.

SLURM sends SIGUSR2 (``--signal=USR2@<s>``, submitit's default) before the time limit and before a
preemption, and SIGTERM before it kills a job (scancel, preemption by requeue). A signal may land
in the middle of a step or of a collective, so the handler does no work: it records the signal.
The trainer calls :func:`should_stop` at every step boundary; it reduces the flag across ranks so
that all ranks stop at the same step, save a checkpoint together and return.
"""

from __future__ import annotations

import signal

# Higher wins when ranks disagree: USR2 asks for a checkpoint *and* a requeue, TERM only for a checkpoint.
_PRIORITY = {signal.SIGTERM: 1, signal.SIGUSR2: 2}
_BY_PRIORITY = {v: k for k, v in _PRIORITY.items()}

_received = 0  # priority of the strongest signal seen by this process
_agreed = 0  # priority agreed by all ranks at the last should_stop()


def _on_signal(signum: int, frame) -> None:
    global _received
    _received = max(_received, _PRIORITY[signal.Signals(signum)])


def install() -> dict:
    """Replace the handlers for SIGUSR2 and SIGTERM (including submitit's, which would checkpoint
    and requeue from rank 0 alone, inside the handler) by a flag setter; returns the old ones."""
    return {sig: signal.signal(sig, _on_signal) for sig in _PRIORITY}


def restore(previous: dict) -> None:
    """Put back the handlers that :func:`install` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def should_stop(process_group=None) -> bool:
    """True on every rank when any rank has received SIGUSR2 or SIGTERM.

    Collective when torch.distributed is initialised: every rank of ``process_group`` (default:
    the world) must call it at the same step. Costs one one-element all-reduce and a host sync.
    """
    global _agreed
    flag = _received
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import torch

        device = "cpu"
        if dist.get_backend(process_group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
        flag = int(t.item())
    _agreed = max(_agreed, flag)
    return flag > 0


def stop_signal() -> signal.Signals | None:
    """The signal all ranks agreed on at the last should_stop() that returned True (else the
    strongest one this process saw), or None."""
    level = _agreed or _received
    return _BY_PRIORITY.get(level)
