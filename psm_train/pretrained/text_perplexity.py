"""Perplexity of a trained model on a plain text file, scored as lm-evaluation-harness scores it.

The file is cut into documents (WikiText's ``` = Title = ``` article headings start one; a file
without them is one document). Each document is tokenized whole, prefixed with the end-of-text
token, and scored in windows of at most ``max_length`` tokens: lm-eval's ``loglikelihood_rolling``
windows (every token predicted once; a window starts afresh, the last one takes the preceding
tokens as context). Words and bytes are counted as lm-eval's perplexity tasks count them, so
``word_perplexity`` is the number lm-eval reports for the same documents.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

# A WikiText article heading: " = Title = " (sections are " = = Section = = ").
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def documents(text: str) -> list[str]:
    """The documents of a text file, each stripped of surrounding whitespace; empty ones dropped."""
    docs, current = [], []
    for line in text.splitlines():
        if ARTICLE_HEADING.match(line) and any(s.strip() for s in current):
            docs.append("\n".join(current))
            current = []
        current.append(line)
    docs.append("\n".join(current))
    return [d.strip() for d in docs if d.strip()]


def count_words(doc: str) -> int:
    """Whitespace-separated pieces, as lm-eval counts them (``len(re.split(r"\\s+", doc))``)."""
    return len(re.split(r"\s+", doc))


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """Windows over ``[prefix] + tokens`` (n_tokens + 1 ids): (start, end, scored) feeds ids[start:end]
    and scores the predictions of its last ``scored`` positions; together they predict every token once."""
    if n_tokens == 0:
        return []
    predicted = min(max_length, n_tokens)
    windows = [(0, predicted, predicted)]  # the prefix and the first tokens
    while predicted < n_tokens:
        scored = min(max_length, n_tokens - predicted)
        end = predicted + scored
        windows.append((end - max_length, end, scored))  # end > max_length here: a full window
        predicted = end
    return windows


@torch.no_grad()
def loglikelihood(model, ids: list[int], prefix_id: int, max_length: int) -> float:
    """Sum of log p(ids[i] | prefix, ids[:i]) over the document, in `rolling_windows`."""
    full = torch.tensor([prefix_id, *ids])
    total = 0.0
    for start, end, scored in rolling_windows(len(ids), max_length):
        logits = model(full[start:end][None])[0, -scored:].double()
        targets = full[end - scored + 1 : end + 1]
        total += float(logits.log_softmax(-1).gather(-1, targets[:, None]).sum())
    return total


def text_perplexity(model, tokenizer, path: str | Path, max_length: int = 2048) -> dict[str, float]:
    """Word, byte and token perplexity (and bits per byte) of the documents of the text file ``path``."""
    text = Path(path).read_text(encoding="utf-8")
    docs = documents(text)
    if not docs:
        raise ValueError(f"--text {path}: holds no text")
    if max_length < 1:
        raise ValueError(f"--max-length: expected >= 1, got {max_length}")
    ll = words = n_bytes = tokens = 0
    for doc in docs:
        ids = tokenizer.encode(doc)
        ll += loglikelihood(model, ids, tokenizer.eot_id, max_length)
        words += count_words(doc)
        n_bytes += len(doc.encode("utf-8"))
        tokens += len(ids)
    return {"documents": len(docs), "words": words, "bytes": n_bytes, "tokens": tokens, "loglikelihood": ll,
            "word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
            "bits_per_byte": -ll / n_bytes / math.log(2), "token_perplexity": math.exp(-ll / tokens)}
