"""The manifest of a shard directory: what the loader trusts about the shards, and its checks.

``manifest.json`` lists per split the shards in order with their sample counts, sizes and sha256,
plus the sequence length, token dtype, tokenizer file and hash, and where the text came from. It
holds no timestamps, so identical inputs give an identical manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from psm_train.errors import DataError

VERSION = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    name: str  # file name relative to the manifest's directory
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    seq_len: int  # a sample holds seq_len + 1 tokens: inputs and shifted targets
    dtype: str  # numpy dtype of the stored tokens
    vocab_size: int
    eot_id: int
    tokenizer: dict  # {"file", "sha256", "kind"}
    splits: dict[str, list[Shard]]
    raw: dict

    @property
    def sha256(self) -> str:
        """Hash of the manifest's content: identifies the data in checkpoint cursors."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DataError(f"{self.path}: no split {split!r} (has {', '.join(self.splits)})")
        return self.splits[split]


def write_manifest(path: Path, content: dict) -> None:
    path.write_text(json.dumps({"version": VERSION, **content}, indent=1, sort_keys=True) + "\n")


def load_manifest(path: str | Path) -> Manifest:
    """Read ``path`` (a manifest.json or a directory holding one); errors name the file and field."""
    path = Path(path)
    directory = path.parent if path.name == "manifest.json" else path
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest; build the shards with `psm-train data build ... --out {directory}`")
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != VERSION:
            raise DataError(f"{path}: version: expected {VERSION}, got {raw.get('version')!r}")
        splits = {name: [Shard(**s) for s in split["shards"]] for name, split in raw["splits"].items()}
        return Manifest(path, int(raw["seq_len"]), str(raw["dtype"]), int(raw["vocab_size"]), int(raw["eot_id"]),
                        dict(raw["tokenizer"]), splits, raw)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e})") from None


def local_path(url: str) -> str | None:
    """The file path of a plain or file:// shard URL; None for pipe:, http: and other schemes."""
    if url.startswith("file:"):
        return re.sub(r"^file://?", "", url)  # as webdataset's gopen reads it
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", url) else url


def check_shard(manifest: Manifest, shard: Shard, url: str, mode: str) -> str | None:
    """Why a local shard does not match its manifest entry (None if it does or cannot be checked).

    mode: 'size' compares file sizes (cheap; catches truncation), 'sha256' hashes every byte.
    Remote shards (pipe:, http:) are checked while they are read.
    """
    local = local_path(url)
    if mode == "none" or local is None:
        return None
    if not os.path.isfile(local):
        return f"missing file {local}"
    size = os.path.getsize(local)
    if size != shard.bytes:
        return f"size {size} bytes, manifest {manifest.path} says {shard.bytes}"
    if mode == "sha256":
        digest = sha256_file(local)
        if digest != shard.sha256:
            return f"sha256 {digest[:16]}..., manifest {manifest.path} says {shard.sha256[:16]}..."
    return None
