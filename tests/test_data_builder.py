"""The shard builder: inputs of every kind, packing, manifest, byte-identical rebuilds, tokenizers."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from psm_train.cli import main
from psm_train.errors import DataError
from psm_train.data.manifest import load_manifest, sha256_file
from psm_train.data.shard_reader import shard_samples
from psm_train.data.shards import BuildOptions, build_shards
from psm_train.data.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "docs").mkdir()
    for i in range(12):
        (root / "docs" / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 300)) + "\n")
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        for i in range(10):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, 200)), "id": i}) + "\n")
    return root


def options(corpus: Path, out: Path, **kw) -> BuildOptions:
    defaults = dict(vocab_size=300, seq_len=16, shard_samples=64, val_fraction=0.2, workers=2, progress=False)
    return BuildOptions(out=out, inputs=[str(corpus / "docs"), str(corpus / "*.jsonl.gz")], **{**defaults, **kw})


def read_split(manifest, split: str) -> np.ndarray:
    return np.stack([t for s in manifest.shards(split)
                     for t in shard_samples(str(manifest.path.parent / s.name), s.samples, manifest.seq_len + 1, manifest.dtype)])


def test_builder_packs_every_document_into_overlapping_blocks(corpus, tmp_path):
    m = build_shards(options(corpus, tmp_path / "out"))
    assert m.seq_len == 16 and m.dtype == "uint16" and m.vocab_size == 300
    assert m.raw["source"]["files"] == 13
    docs = m.raw["splits"]["train"]["documents"] + m.raw["splits"]["val"]["documents"]
    assert docs == 12 + 10 and m.raw["splits"]["val"]["documents"] > 0
    train = read_split(m, "train")
    assert len(train) == m.raw["splits"]["train"]["samples"] > 64  # more than one shard
    assert (train[1:, 0] == train[:-1, -1]).all()  # consecutive blocks share one token
    stream = np.concatenate([train[0], *train[1:, 1:]])
    assert (stream == m.eot_id).sum() >= 1
    text = Tokenizer(m.path.parent / m.tokenizer["file"]).decode(stream.tolist())
    assert set(text.replace("<|endoftext|>", " ").split()[:-1]) <= set(WORDS)  # the dropped tail may cut the last word


def test_rebuild_is_byte_identical_for_any_worker_count_and_corpus_location(corpus, tmp_path):
    a = build_shards(options(corpus, tmp_path / "a"))
    again = build_shards(options(corpus, tmp_path / "a"))  # in place, over the first build
    shutil.copytree(corpus, tmp_path / "copy")
    b = build_shards(options(tmp_path / "copy", tmp_path / "b", workers=1))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "manifest.json":  # its source description names the input paths
            assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name
    assert again.sha256 == a.sha256
    a.raw["source"].pop("description"), b.raw["source"].pop("description")
    assert a.raw == b.raw


def test_given_tiktoken_file_and_manifest_hashes(corpus, tmp_path):
    bpe = tmp_path / "bytes.tiktoken"  # the smallest tiktoken file: the 256 bytes, no merges
    bpe.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    m = build_shards(options(corpus, tmp_path / "out", tokenizer=str(bpe)))
    assert m.vocab_size == 257 and m.eot_id == 256 and m.tokenizer["kind"] == "tiktoken"
    assert m.tokenizer["sha256"] == sha256_file(bpe)
    for shard in m.shards("train"):
        assert shard.sha256 == sha256_file(m.path.parent / shard.name)
    words = bytes(int(t) if t != 256 else 32 for t in read_split(m, "val")[0]).decode().split()
    assert set(words[1:-1]) <= set(WORDS)  # the block's ends may cut words


def test_embedded_stdlib_corpus_through_the_cli(tmp_path, capsys):
    main(["data", "build", "--corpus", "python-stdlib", "--max-bytes", "300000", "--vocab-size", "512", "--seq-len", "32",
          "--val-fraction", "0.2", "--out", str(tmp_path / "std"), "--quiet"])
    m = load_manifest(tmp_path / "std")
    assert m.raw["source"]["description"].startswith("python-stdlib") and 0 < m.raw["source"]["bytes"] <= 300000
    main(["data", "verify", str(tmp_path / "std")])
    assert "ok: every shard matches" in capsys.readouterr().out


def test_errors_name_the_file_and_field(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*'text'"):
        build_shards(BuildOptions(out=tmp_path / "o", inputs=[str(bad)], workers=1, progress=False))
    with pytest.raises(DataError, match="--input .*missing"):
        build_shards(BuildOptions(out=tmp_path / "o", inputs=[str(tmp_path / "missing")], progress=False))


def test_failed_build_leaves_the_output_as_it_was(corpus, tmp_path):
    with pytest.raises(DataError, match="--val-fraction 0.001: the held-out documents fill no"):
        build_shards(options(corpus, tmp_path / "new", val_fraction=0.001, workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no shards without a manifest, no work directory
    out = tmp_path / "old"
    before = build_shards(options(corpus, out, workers=1))
    (out / "notes.txt").write_text("mine")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="held-out documents"):
        build_shards(options(corpus, out, val_fraction=0.001, workers=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files and load_manifest(out).raw == before.raw
    # A successful rebuild replaces the shards (fewer of them here) and keeps other files.
    after = build_shards(options(corpus, out, shard_samples=10_000, workers=1))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert (out / "notes.txt").read_text() == "mine" and after.raw != before.raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
