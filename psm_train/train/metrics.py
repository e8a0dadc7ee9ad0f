"""Where training metrics go: metrics.jsonl (one JSON object per logged step), the console, wandb."""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (written after the checkpoint a run resumes from), so curves don't double back.

    An unparsable last line is what a crash or a full disk leaves mid-write: dropped with a warning. An
    unparsable line elsewhere is damage this function will not guess about: ValueError naming the line.
    """
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            if number == len(lines):
                print(f"warning: {path}:{number}: dropping a partly written last line ({line[:60]!r})",
                      file=sys.stderr, flush=True)
                continue
            raise ValueError(f"{path}:{number}: not a metrics record ({type(e).__name__}: {e}); "
                             "fix or delete the line, then resume") from None
        if record_step <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)  # a crash here leaves the old file, never a half-rewritten one


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_run: Any = None, stream=None):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.wandb_run = wandb_run
        self.stream = sys.stdout if stream is None else stream  # the current one, not the one at import
        self.live = self.stream.isatty()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must contain "step") to metrics.jsonl and wandb; flushed at once."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def show(self, text: str, final: bool = False) -> None:
        """A progress line: rewritten in place on a terminal, one line per call otherwise."""
        if self.live and not final:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(cfg, run_dir: Path):
    """A wandb run when enabled; WANDB_MODE=offline works without a login."""
    if not cfg.wandb.enabled:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("wandb.enabled is true but wandb is not installed: pip install 'psm-train[wandb]'") from None
    # The id lives in the run directory so that a resumed or requeued run continues the same wandb run.
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(6))
    return wandb.init(
        id=id_file.read_text().strip(),
        resume="allow",
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.name or cfg.name,
        dir=str(run_dir),
        config=cfg.to_dict(),
    )


class Throughput:
    """Tokens per second since the last call."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate
