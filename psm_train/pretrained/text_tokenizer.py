"""Text in, token ids out, and back: the tokenizer an exported model ships with.

The data pipeline's `psm_train.data.tokenizer.Tokenizer` ends every document with the end-of-text
token; a prompt must not end with it, so `TextTokenizer.encode` returns the ids without it.
"""

from __future__ import annotations

from pathlib import Path

from psm_train.data.tokenizer import Tokenizer

# The file names an export directory uses for each kind of tokenizer file.
FILE_NAMES = {"tokenizers": "tokenizer.json", "tiktoken": "tokenizer.tiktoken"}


class TextTokenizer:
    """encode(text) -> list of ids; decode(ids) -> text. ``eot_id`` separates documents."""

    def __init__(self, path: str | Path):
        self._tok = Tokenizer(path)
        self.path, self.kind = self._tok.path, self._tok.kind
        self.eot_id, self.vocab_size = self._tok.eot_id, self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)[:-1].tolist()

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.kind}, {self.path.name}, vocab_size={self.vocab_size})"
