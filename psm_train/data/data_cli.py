"""``psm-train data build`` (text -> token shards) and ``psm-train data verify`` (shards vs manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from psm_train.data.corpora import CORPORA
from psm_train.errors import DataError


def cmd_build(args: argparse.Namespace) -> None:
    from psm_train.data.shards import BuildOptions, build_shards

    opts = BuildOptions(out=Path(args.out), inputs=args.inputs, corpus=args.corpus or "", jsonl_field=args.jsonl_field,
                        tokenizer=args.tokenizer or "", vocab_size=args.vocab_size, seq_len=args.seq_len,
                        shard_samples=args.shard_samples, val_fraction=args.val_fraction, max_bytes=args.max_bytes,
                        seed=args.seed, workers=args.workers, progress=not args.quiet)
    try:
        build_shards(opts)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_verify(args: argparse.Namespace) -> None:
    from psm_train.data.manifest import check_shard, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    bad = 0
    for split, shards in manifest.splits.items():
        for shard in shards:
            problem = check_shard(manifest, shard, str(manifest.path.parent / shard.name), "sha256")
            bad += problem is not None
            if problem:
                print(f"MISMATCH {split} {shard.name}: {problem}")
        print(f"{split}: {len(shards)} shards, {sum(s.samples for s in shards)} samples of {manifest.seq_len + 1} tokens")
    if bad:
        raise SystemExit(f"error: {bad} shard(s) do not match {manifest.path}")
    print(f"ok: every shard matches {manifest.path} (sha256)")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and check tokenized webdataset shards").add_subparsers(dest="data_command", required=True)

    p = data.add_parser("build", help="tokenize text into train/val shards with a manifest",
                        description="Text from --input files, directories, globs (.gz and .jsonl read too) and/or an embedded "
                                    "--corpus, tokenized with --tokenizer or a byte-level BPE trained here, packed into "
                                    "blocks of --seq-len + 1 tokens, written as webdataset tars plus manifest.json.")
    p.add_argument("--out", required=True, help="output directory (its old shards are replaced)")
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="PATH",
                   help="a file, directory or glob (repeatable); .gz is decompressed, .jsonl gives one document per line")
    p.add_argument("--corpus", choices=sorted(CORPORA), help="an embedded corpus that needs no download")
    p.add_argument("--jsonl-field", default="text", help="the text field of JSONL records (default text)")
    p.add_argument("--tokenizer", help="a tokenizers JSON or a tiktoken BPE file (e.g. gpt2.tiktoken); default: train a byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length; samples hold seq_len + 1 tokens (default 512)")
    p.add_argument("--shard-samples", type=int, default=8192, help="samples per shard (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation (default 0.01)")
    p.add_argument("--max-bytes", type=int, default=0, help="use at most this many input bytes, files in seeded order (default: all)")
    p.add_argument("--seed", type=int, default=0, help="file order and train/val split (default 0)")
    p.add_argument("--workers", type=int, default=0, help="tokenizing/writing processes (default: one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_build)

    p = data.add_parser("verify", help="check every shard's size and sha256 against the manifest")
    p.add_argument("manifest", help="manifest.json or the directory holding it")
    p.set_defaults(func=cmd_verify)
