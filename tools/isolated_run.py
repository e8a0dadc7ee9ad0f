"""One benchmark configuration per child process, under a wall-clock limit (used by the bench tools).

After a CUDA out-of-memory error a process keeps tensors alive through the exception's traceback
and a fragmented caching allocator, so in a benchmark that measures many configurations in one
process every later configuration can fail too. A child process per configuration gives all its
memory back when it exits, and its limit covers everything it does: building the model,
compiling, Triton's autotuning and the timed steps.

The parent runs ``cmd + ["--row-out", PATH]``; the child writes its result (any JSON value) to
PATH with `write_result`. Without a result the parent reports an error row instead: "oom" for an
out-of-memory error, "timeout after N s", or the exit status and the last line of stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

OOM = "oom"
_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def run_isolated(cmd: list[str], timeout_s: float) -> tuple[object | None, str | None]:
    """Run ``cmd`` with ``--row-out PATH`` appended, at most ``timeout_s`` seconds.

    Returns (what the child wrote, None), or (None, error) when it wrote nothing. The child's
    stdout passes through; its stderr is echoed only when it fails. On the time limit the
    child's whole process group is killed (compile workers included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([*cmd, "--row-out", str(out)], stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return None, f"timeout after {timeout_s:g} s"
        except BaseException:  # Ctrl-C: the child sits in its own session and would outlive us
            _kill(proc)
            raise
        if out.exists():
            return json.loads(out.read_text()), None
    sys.stderr.write(stderr[-3000:])
    if any(m in stderr for m in _OOM_MARKERS):
        return None, OOM
    last = stderr.strip().splitlines()[-1:] or [""]
    return None, f"exit {proc.returncode}: {last[0][:120]}"


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def write_result(path: str, result: object) -> None:
    """The child's side: hand ``result`` to the parent."""
    Path(path).write_text(json.dumps(result))
