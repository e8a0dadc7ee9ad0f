"""Text inputs of the shard builder: files, globs, directories, .gz, JSONL, and embedded corpora.

A corpus is an ordered list of ``InputFile``s; a file yields one document (plain text) or one per
line (JSONL). Names, not absolute paths, decide the order and the train/val split, so a corpus
copied elsewhere builds the same shards.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from psm_train.errors import DataError


@dataclass(frozen=True)
class InputFile:
    name: str  # relative to the directory or the glob's fixed prefix; a single file's base name
    path: str
    size: int  # bytes on disk (compressed size for .gz)


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith(".jsonl")


def expand_inputs(specs: list[str]) -> list[InputFile]:
    """Files named by ``specs`` (a file, a directory walked recursively, or a glob), in order, deduplicated.

    Names leave out where the corpus lies, so a copy elsewhere gets the same order and split.
    """
    found: dict[str, InputFile] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file()]
        elif glob.has_magic(spec):
            parts = path.parts
            root = Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))] or ["."])
            files = [(Path(p).relative_to(root).as_posix(), Path(p)) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        elif path.is_file():
            files = [(path.name, path)]
        else:
            raise DataError(f"--input {spec}: no such file or directory")
        if not files:
            raise DataError(f"--input {spec}: matches no files")
        for name, p in files:
            found.setdefault(str(p), InputFile(name, str(p), p.stat().st_size))
    return list(found.values())


def python_stdlib() -> tuple[list[InputFile], str]:
    """The running Python's standard-library sources (*.py, site-packages excluded) and a description."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        InputFile(p.relative_to(root).as_posix(), str(p), p.stat().st_size)
        for p in sorted(root.rglob("*.py"))
        if "site-packages" not in p.relative_to(root).parts
    ]
    version = ".".join(map(str, sys.version_info[:3]))
    return files, f"python-stdlib: *.py of the Python {version} standard library ({root})"


CORPORA = {"python-stdlib": python_stdlib}


def shuffle_and_cap(files: list[InputFile], seed: int, max_bytes: int) -> list[InputFile]:
    """A seeded order by name (so that topics mix across shards), cut at ``max_bytes`` (0: no cap)."""
    order = sorted(files, key=lambda f: hashlib.sha256(f"{seed}:{f.name}".encode()).digest())
    if not max_bytes:
        return order
    kept, total = [], 0
    for f in order:
        if total + f.size > max_bytes:
            continue
        kept.append(f)
        total += f.size
    return kept


def read_documents(f: InputFile, jsonl_field: str) -> Iterator[tuple[str, str]]:
    """(document name, text) pairs of one file; undecodable bytes become U+FFFD."""
    opener = gzip.open if f.path.endswith(".gz") else open
    with opener(f.path, "rb") as fh:
        if not _is_jsonl(f.path):
            yield f.name, fh.read().decode("utf-8", errors="replace")
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f.path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(jsonl_field), str):
                raise DataError(f"{f.path}:{lineno}: expected an object with a string field {jsonl_field!r} (set --jsonl-field)")
            yield f"{f.name}:{lineno}", record[jsonl_field]


def is_validation(doc_name: str, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its name, so the split ignores file order and workers."""
    digest = hashlib.sha256(f"val:{seed}:{doc_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction
