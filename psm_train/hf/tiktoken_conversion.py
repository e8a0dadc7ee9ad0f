"""A tiktoken BPE file as a `tokenizers` tokenizer.json, for transformers' PreTrainedTokenizerFast.

tiktoken merges, within each GPT-2 pre-tokenized piece, the adjacent pair whose concatenation has
the lowest rank. A byte-level BPE whose merge list is every (left, right) split of each token,
ordered by the token's rank, does the same; tokens are written in GPT-2's byte-to-character
alphabet, as byte-level BPE stores them.
"""

from __future__ import annotations

import base64
from pathlib import Path


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (byte-level BPE's token spelling)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiktoken_to_tokenizers(path: str | Path):
    """The `tokenizers.Tokenizer` equivalent of the tiktoken file ``path`` (GPT-2's split pattern, the
    end-of-text token after the ranks, as `psm_train.data.tokenizer.Tokenizer` reads it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from psm_train.data.tokenizer import EOT, GPT2_PATTERN

    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    alphabet = byte_alphabet()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    bpe = models.BPE(vocab={spell(t): r for t, r in ranks.items()}, merges=[(m[3], m[4]) for m in merges],
                     ignore_merges=True)  # tiktoken takes a piece that is itself a token whole
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    if tok.token_to_id(EOT) != len(ranks):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}; the end-of-text id would differ from psm-train's")
    return tok
