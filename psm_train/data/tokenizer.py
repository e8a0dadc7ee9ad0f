"""Tokenizers for the shard builder: a byte-level BPE trained here, or a given file.

Given files are a ``tokenizers`` JSON or a tiktoken BPE file (``base64-token rank`` per line, e.g.
GPT-2's ``gpt2.tiktoken``, read with GPT-2's split pattern). Every document ends with the
end-of-text token, so the model sees document boundaries.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from psm_train.errors import DataError

EOT = "<|endoftext|>"
# r50k_base (GPT-2) pre-tokenization pattern, as in tiktoken.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """encode(text) -> uint32 ids ending in the end-of-text id; kind is 'tokenizers' or 'tiktoken'."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = self.path.read_bytes()
        if raw.lstrip()[:1] == b"{":
            self.kind = "tokenizers"
            self._init_tokenizers()
        else:
            self.kind = "tiktoken"
            self._init_tiktoken(raw)

    def _init_tokenizers(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises bare Exceptions on bad JSON
            raise DataError(f"--tokenizer {self.path}: not a tokenizers JSON file ({e})") from None
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise DataError(f"--tokenizer {self.path}: expected a special token {EOT!r} in the vocabulary")
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in the text is text, not a boundary
        self._tok, self.eot_id, self.vocab_size = tok, eot, tok.get_vocab_size()

    def _init_tiktoken(self, raw: bytes) -> None:
        import tiktoken

        ranks = {}
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise DataError(f"--tokenizer {self.path}:{lineno}: expected 'base64-token rank' (a tiktoken BPE file) or a tokenizers JSON") from None
        self.eot_id = len(ranks)
        self._tok = tiktoken.Encoding(self.path.name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: self.eot_id})
        self.vocab_size = self.eot_id + 1

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode_ordinary(text) if self.kind == "tiktoken" else self._tok.encode(text, add_special_tokens=False).ids
        out = np.empty(len(ids) + 1, dtype=np.uint32)
        out[:-1] = ids
        out[-1] = self.eot_id
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, end-of-text tokens shown as such."""
        return self._tok.decode(ids) if self.kind == "tiktoken" else self._tok.decode(ids, skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train a byte-level BPE (every byte is a token, so any text encodes) and save it as JSON."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"--vocab-size: expected >= 258 (256 bytes + {EOT} + merges), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out_path))
    return Tokenizer(out_path)
