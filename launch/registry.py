"""A run's job record: ``run_dir/jobs.jsonl``, one JSON event per line, appended by the submitting
command (``submitted``) and by the job itself (``started``, ``requeued``, ``stopped``, ``failed``,
``finished``). ``psm-train jobs`` reads it; retry budgets are counted from it.

Lines are short and written with one ``write`` in append mode, so ranks appending at the same
moment do not interleave.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

FILENAME = "jobs.jsonl"


def append(run_dir: Path, event: str, **fields: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}) + "\n"
    with (run_dir / FILENAME).open("a") as f:
        f.write(line)


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FILENAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def requeues(run_dir: Path, job_id: str, kind: str) -> int:
    """How many times job ``job_id`` was requeued for ``kind`` (preempted | failed).

    Several ranks may record the same failure; SLURM's restart count tells attempts apart.
    """
    return len({e["restart"] for e in read(run_dir)
                if e["event"] == "requeued" and e["job_id"] == job_id and e["kind"] == kind})
