"""A reduced vocabulary for the lab: the Mixtral tokenizer's ids remapped to the most frequent few thousand.

At the lab's scale (dim 64) a 32,000-word output layer would cost more CPU time than everything else, so
:class:`ReducedTokenizer` keeps the ``size - 2`` ids most frequent in the *training* split, maps every
other id to ``UNK = 0`` and keeps BOS at 1. Cross-entropies of the lab are over this reduced vocabulary
(an unknown token is predicted as UNK), the same for every recipe, so they compare recipes, not models
elsewhere in the project.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..tokenizer import load_tokenizer

UNK, BOS = 0, 1


class ReducedTokenizer:
    """Wraps a tokenizer (``encode_batch``, ``bos_id``) with an id map ``old id -> new id``."""

    def __init__(self, base, keep_ids: np.ndarray, size: int):
        keep_ids = np.asarray(keep_ids, dtype=np.int64)
        if len(keep_ids) > size - 2:
            raise ValueError(f"ReducedTokenizer: {len(keep_ids)} kept ids do not fit a vocabulary of size {size}")
        self.base, self.vocab_size, self.bos_id, self.unk_id = base, size, BOS, UNK
        self.keep_ids = keep_ids
        self.table = np.full(base.vocab_size, UNK, dtype=np.int64)
        self.table[keep_ids] = np.arange(2, 2 + len(keep_ids))
        self.table[base.bos_id] = BOS
        self.inverse = np.concatenate([[base.unk_id, base.bos_id], keep_ids])
        self.sha256 = hashlib.sha256(f"{getattr(base, 'sha256', '')}:{size}:".encode() + keep_ids.tobytes()).hexdigest()

    def encode_batch(self, texts, bos: bool = True, eos: bool = False) -> list[list[int]]:
        return [self.table[np.asarray(ids, dtype=np.int64)].tolist() for ids in self.base.encode_batch(texts, bos=bos, eos=eos)]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def decode(self, ids) -> str:
        return self.base.decode(self.inverse[np.asarray(ids, dtype=np.int64)].tolist())

    def unk_share(self, ids: np.ndarray) -> float:
        ids = np.asarray(ids)
        return float((ids == UNK).mean()) if ids.size else 0.0


def reduced_tokenizer(corpus, size: int, base=None) -> ReducedTokenizer:
    """The ``size - 2`` ids most frequent in ``corpus.train`` (ties by id) kept, the rest UNK."""
    base = base or load_tokenizer()
    counts = np.zeros(base.vocab_size, dtype=np.int64)
    texts = [d.text for d in corpus.train]
    for i in range(0, len(texts), 256):
        for ids in base.encode_batch(texts[i:i + 256], bos=False):
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=base.vocab_size)
    counts[[base.bos_id, base.unk_id]] = -1
    order = np.lexsort((np.arange(base.vocab_size), -counts))
    keep = order[:size - 2]
    keep = keep[counts[keep] > 0]
    return ReducedTokenizer(base, np.sort(keep), size)
