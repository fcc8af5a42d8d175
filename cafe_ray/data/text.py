"""AG News (CSV release) reader, tokenizer and vocabulary.

Deliberately simple and dependency-free (no torchtext, no HF tokenizers): a
lowercase regex tokenizer and a frequency vocabulary built on the training split
only, so the test split never leaks into the vocabulary.
"""

from __future__ import annotations

import csv
import html
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cafe_ray.data.readers import CorruptDatasetError

AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
PAD_ID, UNK_ID = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase word/number tokens; unescapes the release's HTML entities and '\\' escapes."""
    text = html.unescape(text.replace("\\", " ").replace(" #39;", "'").replace("#39;", "'"))
    return _TOKEN.findall(text.lower())


def read_agnews_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """(texts, labels 0..3) from a ``"class index","title","description"`` CSV; a header row is skipped."""
    texts: list[str] = []
    labels: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not any(c.strip() for c in row):
                    continue
                head = row[0].strip()
                if n == 1 and not head.lstrip("-").isdigit():
                    continue  # header row, e.g. "Class Index,Title,Description"
                if len(row) < 2 or not head.lstrip("-").isdigit() or not 1 <= int(head) <= 4:
                    raise CorruptDatasetError(
                        f"{path}:{n}: expected '\"class index (1-4)\",\"title\",\"description\"', got {row[:3]!r}"
                    )
                labels.append(int(head) - 1)
                texts.append(" ".join(row[1:]))
    except (UnicodeDecodeError, csv.Error) as err:
        raise CorruptDatasetError(f"{path}: not a readable AG News CSV ({err})") from None
    if not texts:
        raise CorruptDatasetError(f"{path}: no rows")
    return texts, np.asarray(labels, dtype=np.int64)


def build_vocab(token_lists: Iterable[list[str]], vocab_size: int) -> dict[str, int]:
    """The ``vocab_size - 2`` most frequent tokens (ties by token) -> ids 2.. (0 pad, 1 unk)."""
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(toks)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(vocab_size - 2, 0)]
    return {tok: i + 2 for i, (tok, _) in enumerate(ranked)}


def encode(token_lists: list[list[str]], vocab: dict[str, int], seq_len: int) -> np.ndarray:
    """int64 (N, seq_len) ids, truncated or right-padded with PAD_ID."""
    out = np.full((len(token_lists), seq_len), PAD_ID, dtype=np.int64)
    for i, toks in enumerate(token_lists):
        ids = [vocab.get(t, UNK_ID) for t in toks[:seq_len]]
        out[i, : len(ids)] = ids
    return out
