"""The shard builder: text -> tokens -> fixed-size blocks -> webdataset tar shards + manifest.

Worker processes tokenize files (results come back in input order) and write shards; the main
process only packs. Sample k of a split holds tokens [k*T, k*T + T + 1) of the split's token
stream (documents joined by end-of-text), so consecutive samples overlap by one token and every
token after the first is a target exactly once. Tars get fixed mtimes and owners, the manifest
no timestamps: the same inputs and options give byte-identical output for any worker count.

Everything is built in a hidden directory beside the output and published only when the build
succeeded (manifest.json last), so a failed build leaves the output as it was.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psm_train.data.corpora import CORPORA, InputFile, expand_inputs, is_validation, read_documents, shuffle_and_cap
from psm_train.data.manifest import Manifest, load_manifest, sha256_file, write_manifest
from psm_train.data.tokenizer import Tokenizer, train_bpe
from psm_train.errors import DataError

SPLITS = ("train", "val")


@dataclass
class BuildOptions:
    out: Path
    inputs: list[str] = field(default_factory=list)
    corpus: str = ""  # an embedded corpus name (see corpora.CORPORA), instead of or besides inputs
    jsonl_field: str = "text"
    tokenizer: str = ""  # a tokenizers JSON or tiktoken BPE file; "" trains a byte-level BPE
    vocab_size: int = 8192  # of the trained BPE
    seq_len: int = 512
    shard_samples: int = 8192
    val_fraction: float = 0.01
    max_bytes: int = 0  # cap on input bytes (0: all)
    seed: int = 0  # file order and the train/val split
    workers: int = 0  # 0: one per CPU
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs and not self.corpus:
            raise DataError("give --input PATH (repeatable) or --corpus NAME")
        if self.corpus and self.corpus not in CORPORA:
            raise DataError(f"--corpus {self.corpus}: unknown (known: {', '.join(CORPORA)})")
        for name in ("seq_len", "shard_samples"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"--val-fraction: expected a number in [0, 1), got {self.val_fraction}")


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every 10 s otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = self.last = time.perf_counter()

    def show(self, text: str, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or not (final or now - self.last >= (0.5 if self.tty else 10)):
            return
        self.last = now
        line = f"[data build {now - self.started:6.1f}s] {text}"
        print(f"\r{line}\033[K" if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


# ---- worker side -------------------------------------------------------------------------------

_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer(tokenizer_path)


def _tokenize_file(f: InputFile, jsonl_field: str, seed: int, val_fraction: float) -> dict:
    """Token ids of one file's documents, per split, each document ended by end-of-text."""
    parts = {s: [] for s in SPLITS}
    for doc_name, text in read_documents(f, jsonl_field):
        parts["val" if is_validation(doc_name, seed, val_fraction) else "train"].append(_tokenizer.encode(text))
    empty = np.empty(0, np.uint32)
    return {
        "tokens": {s: np.concatenate(p) if p else empty for s, p in parts.items()},
        "docs": {s: len(p) for s, p in parts.items()},
        "sha256": sha256_file(f.path),
    }


def _write_shard(path: str, index: int, first_key: int, blocks: np.ndarray) -> dict:
    import webdataset as wds

    with wds.ShardWriter(path, maxcount=len(blocks), start_shard=index, verbose=0, mtime=0, user="psm", group="psm") as w:
        for i, block in enumerate(blocks):
            w.write({"__key__": f"{first_key + i:010d}", "tokens": block.tobytes()})
    name = path % index
    return {"name": Path(name).name, "samples": len(blocks), "bytes": os.path.getsize(name), "sha256": sha256_file(name)}


# ---- main side ---------------------------------------------------------------------------------


class Packer:
    """Cuts one split's token stream into shards of ``shard_samples`` blocks of seq_len + 1 tokens."""

    def __init__(self, split: str, out: Path, seq_len: int, shard_samples: int, dtype: str, submit):
        self.pattern = str(out / f"{split}-%06d.tar")
        self.seq_len, self.shard_samples, self.dtype, self.submit = seq_len, shard_samples, np.dtype(dtype), submit
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards = 0
        self.samples = 0
        self.tokens = 0  # tokens seen, for the dropped-tail count

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        while self.pending_tokens >= self.shard_samples * self.seq_len + 1:
            self._emit(self.shard_samples)

    def finish(self) -> int:
        """Write the last, shorter shard; returns the number of tail tokens that fill no block."""
        blocks = (self.pending_tokens - 1) // self.seq_len if self.pending_tokens else 0
        if blocks > 0:
            self._emit(blocks)
        return self.tokens - self.samples * self.seq_len - (1 if self.samples else 0)

    def _emit(self, blocks: int) -> None:
        stream = np.concatenate(self.pending)
        used = blocks * self.seq_len
        windows = np.lib.stride_tricks.sliding_window_view(stream[: used + 1], self.seq_len + 1)[:: self.seq_len]
        self.submit(self.pattern, self.shards, self.samples, windows.astype(self.dtype))
        self.pending, self.pending_tokens = [stream[used:]], len(stream) - used  # the last token starts the next block
        self.shards += 1
        self.samples += blocks


def _corpus_files(opts: BuildOptions) -> tuple[list[InputFile], str]:
    files, parts = [], []
    if opts.corpus:
        corpus_files, description = CORPORA[opts.corpus]()
        files += corpus_files
        parts.append(description)
    if opts.inputs:
        files += expand_inputs(opts.inputs)
        parts.append("inputs: " + " ".join(opts.inputs))
    files = shuffle_and_cap(files, opts.seed, opts.max_bytes)
    if not files:
        raise DataError(f"--max-bytes {opts.max_bytes}: every input file is larger; raise it")
    return files, "; ".join(parts)


def _prepare_tokenizer(opts: BuildOptions, files: list[InputFile], progress: Progress, out: Path) -> Tokenizer:
    if opts.tokenizer:
        given = Tokenizer(opts.tokenizer)
        target = out / ("tokenizer.json" if given.kind == "tokenizers" else "tokenizer.tiktoken")
        shutil.copyfile(opts.tokenizer, target)
        return Tokenizer(target)

    def train_texts():
        for i, f in enumerate(files):
            progress.show(f"training a {opts.vocab_size}-token byte-level BPE: file {i + 1}/{len(files)}")
            for doc_name, text in read_documents(f, opts.jsonl_field):
                if not is_validation(doc_name, opts.seed, opts.val_fraction):
                    yield text

    tokenizer = train_bpe(train_texts(), opts.vocab_size, out / "tokenizer.json")
    progress.show(f"trained a {tokenizer.vocab_size}-token BPE", final=True)
    return tokenizer


def _built_files(directory: Path) -> list[Path]:
    return [*directory.glob("train-*.tar"), *directory.glob("val-*.tar"), *directory.glob("tokenizer.*")]


def _publish(work: Path, out: Path) -> None:
    """Move a finished build from ``work`` to ``out``: a rename if ``out`` is new; else its old manifest goes
    first (shards without a manifest are never trusted), then its old shards (a rebuild must not leave those of an
    earlier, larger build behind), then the new files, manifest.json last. Other files in ``out`` stay."""
    if not out.exists():
        os.replace(work, out)
        return
    (out / "manifest.json").unlink(missing_ok=True)
    for old in _built_files(out):
        old.unlink()
    for new in _built_files(work):
        os.replace(new, out / new.name)
    os.replace(work / "manifest.json", out / "manifest.json")
    shutil.rmtree(work)


def build_shards(opts: BuildOptions) -> Manifest:
    """Build train and val shards and manifest.json under ``opts.out``; returns the manifest. On failure
    ``opts.out`` is left as it was."""
    opts.validate()
    progress = Progress(opts.progress)
    files, description = _corpus_files(opts)
    work = opts.out.parent / f".{opts.out.name}.building"  # beside the output: publishing is renames
    shutil.rmtree(work, ignore_errors=True)  # left by a build that was killed
    work.mkdir(parents=True)
    try:
        summary = _build_into(opts, files, description, work, progress)
        _publish(work, opts.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = load_manifest(opts.out)
    progress.show(summary, final=True)
    return manifest


def _build_into(opts: BuildOptions, files: list[InputFile], description: str, out: Path, progress: Progress) -> str:
    """Shards, tokenizer and manifest.json in ``out``; returns the summary line for the progress display."""
    tokenizer = _prepare_tokenizer(opts, files, progress, out)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # worker processes tokenize; no threads after fork
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"

    workers = opts.workers or os.cpu_count() or 1
    total_bytes = sum(f.size for f in files)
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        written = {s: [] for s in SPLITS}

        def submitter(split):
            return lambda *args: written[split].append(pool.apply_async(_write_shard, args))

        packers = {s: Packer(s, out, opts.seq_len, opts.shard_samples, dtype, submitter(s)) for s in SPLITS}
        docs = {s: 0 for s in SPLITS}
        corpus_hash = hashlib.sha256()
        done_bytes = 0
        jobs = [(f, opts.jsonl_field, opts.seed, opts.val_fraction) for f in files]
        for f, result in zip(files, pool.imap(_star_tokenize, jobs, chunksize=1)):
            for s in SPLITS:
                packers[s].add(result["tokens"][s])
                docs[s] += result["docs"][s]
            corpus_hash.update(f"{f.name}\0{result['sha256']}\n".encode())
            done_bytes += f.size
            progress.show(f"{done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, "
                          f"{packers['train'].tokens / 1e6:.2f}M train tokens, {sum(len(w) for w in written.values())} shards")
        dropped = {s: p.finish() for s, p in packers.items()}
        shards = {s: [r.get() for r in written[s]] for s in SPLITS}

    if opts.val_fraction > 0 and not shards["val"]:
        raise DataError(f"--val-fraction {opts.val_fraction}: the held-out documents fill no {opts.seq_len + 1}-token block; raise it or add text")
    if not shards["train"]:
        raise DataError(f"the training documents fill no {opts.seq_len + 1}-token block; add text or lower --seq-len")
    write_manifest(out / "manifest.json", {
        "seq_len": opts.seq_len,
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "tokenizer": {"file": tokenizer.path.name, "sha256": sha256_file(tokenizer.path), "kind": tokenizer.kind,
                      "trained_vocab_size": 0 if opts.tokenizer else opts.vocab_size},
        "source": {"description": description, "files": len(files), "bytes": total_bytes, "sha256": corpus_hash.hexdigest(),
                   "jsonl_field": opts.jsonl_field, "max_bytes": opts.max_bytes, "seed": opts.seed, "val_fraction": opts.val_fraction},
        "splits": {s: {"samples": packers[s].samples, "tokens": packers[s].samples * opts.seq_len, "documents": docs[s],
                       "dropped_tail_tokens": dropped[s], "shards": shards[s]} for s in SPLITS},
    })
    return (f"{len(files)} files, {total_bytes / 1e6:.1f} MB -> "
            + ", ".join(f"{s}: {len(shards[s])} shards, {packers[s].samples} samples, {packers[s].samples * opts.seq_len / 1e6:.2f}M tokens" for s in SPLITS)
            + f"; {opts.out / 'manifest.json'}")


def _star_tokenize(args: tuple) -> dict:
    return _tokenize_file(*args)
