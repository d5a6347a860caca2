"""Text to training batches: tokenise the corpus (cached), pack windows per domain, draw the schedule."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import Corpus, build_corpus, load_corpus
from ..tokenizer import load_tokenizer
from .config import REPO_ROOT, DataConfig, TrainConfig

#: Target id that the cross-entropy ignores (BOS targets: a document start is not predictable).
IGNORE = -100

@dataclass
class TokenData:
    """Token ids per split and domain: ``tokens[split][domain]`` is one uint16 array of all the
    documents (each starting with BOS) in corpus order, ``starts[split][domain]`` their offsets."""

    domains: list[str]
    tokens: dict[str, dict[str, np.ndarray]]
    starts: dict[str, dict[str, np.ndarray]]
    fingerprint: str
    bos_id: int = 1

    def n_tokens(self, split: str) -> dict[str, int]:
        return {d: int(len(self.tokens[split][d])) for d in self.domains}

    def documents(self, split: str, domain: str) -> list[np.ndarray]:
        toks, starts = self.tokens[split][domain], self.starts[split][domain]
        ends = np.append(starts[1:], len(toks))
        return [toks[a:b] for a, b in zip(starts, ends)]


def corpus_fingerprint(corpus, tokenizer) -> str:
    h = hashlib.sha256(str(getattr(tokenizer, "sha256", type(tokenizer).__name__)).encode())
    for split in ("train", "heldout"):
        for doc in getattr(corpus, split):
            h.update(f"{split}\0{doc.domain}\0{doc.id}\0".encode())
            h.update(hashlib.sha1(doc.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def tokenize_corpus(corpus, tokenizer, cache_dir: str | os.PathLike | None = None,
                    domains: Sequence[str] | None = None, progress: bool = True) -> TokenData:
    """Encode every document (BOS first, no EOS); cached as ``.npy`` files under
    ``cache_dir/<fingerprint>/`` so a resumed or repeated run skips this step."""
    domains = list(domains or corpus.domains)
    missing = set(domains) - set(corpus.domains)
    if missing:
        raise ValueError(f"domains {sorted(missing)} are not in the corpus ({corpus.domains})")
    fp = corpus_fingerprint(corpus, tokenizer)
    cache = Path(cache_dir) / fp if cache_dir is not None else None
    tokens: dict = {"train": {}, "heldout": {}}
    starts: dict = {"train": {}, "heldout": {}}
    if cache is not None and all((cache / f"{s}-{d}.tokens.npy").exists() for s in tokens for d in domains):
        for s in tokens:
            for d in domains:
                tokens[s][d] = np.load(cache / f"{s}-{d}.tokens.npy")
                starts[s][d] = np.load(cache / f"{s}-{d}.starts.npy")
        return TokenData(domains, tokens, starts, fp, tokenizer.bos_id)
    if tokenizer.vocab_size > 65535:
        raise ValueError("token ids are stored as uint16; vocab_size must be <= 65535")
    n_docs = sum(1 for s in tokens for doc in getattr(corpus, s) if doc.domain in domains)
    with tqdm(total=n_docs, desc="tokenise", unit="doc", disable=not progress) as bar:
        for split in tokens:
            by_domain: dict[str, list[str]] = {d: [] for d in domains}
            for doc in getattr(corpus, split):
                if doc.domain in by_domain:
                    by_domain[doc.domain].append(doc.text)
            for d, texts in by_domain.items():
                ids: list[list[int]] = []
                for i in range(0, len(texts), 256):
                    ids.extend(tokenizer.encode_batch(texts[i:i + 256], bos=True))
                    bar.update(len(texts[i:i + 256]))
                lengths = np.array([len(x) for x in ids], dtype=np.int64)
                starts[split][d] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if ids else np.zeros(0, np.int64)
                tokens[split][d] = (np.fromiter((t for x in ids for t in x), dtype=np.uint16, count=int(lengths.sum()))
                                    if ids else np.zeros(0, np.uint16))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for s in tokens:
            for d in domains:
                np.save(cache / f"{s}-{d}.tokens.npy", tokens[s][d])
                np.save(cache / f"{s}-{d}.starts.npy", starts[s][d])
    return TokenData(domains, tokens, starts, fp, tokenizer.bos_id)


def pack_windows(token_data: TokenData, split: str, domain: str, seq_len: int,
                 shuffle_seed: int | None = None, max_windows: int | None = None) -> np.ndarray:
    """Documents of one domain laid end to end (shuffled when ``shuffle_seed`` is given) and cut
    into windows of ``seq_len + 1`` tokens overlapping by one, so every token is a target once.
    Returns int64 [n_windows, seq_len + 1]."""
    docs = token_data.documents(split, domain)
    if shuffle_seed is not None:
        order = np.random.default_rng([shuffle_seed, _stable_hash(domain)]).permutation(len(docs))
        docs = [docs[i] for i in order]
    return pack_documents(docs, seq_len, max_windows)


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Token arrays (each starting with BOS) laid end to end and cut into windows of ``seq_len + 1``
    tokens overlapping by one (see :func:`pack_windows`). Returns int64 [n_windows, seq_len + 1]."""
    stream = np.concatenate(docs).astype(np.int64) if len(docs) else np.zeros(0, np.int64)
    n = max(0, (len(stream) - 1) // seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx] if n else np.zeros((0, seq_len + 1), np.int64)


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


def inputs_targets(windows: np.ndarray, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] windows -> tokens [B, T], targets [B, T]; BOS targets (a document start cannot be
    predicted from the previous document) are ignored."""
    w = torch.as_tensor(windows, dtype=torch.long)
    x, y = w[:, :-1], w[:, 1:].clone()
    y[y == bos_id] = IGNORE
    return x, y


def batch_schedule(n_windows: dict[str, int], steps: int, batch_size: int, seed: int,
                   alpha: float = 1.0, weights: dict[str, float] | None = None) -> np.ndarray:
    """[steps, batch_size, 2] (domain index, window index): which window each sequence of each
    step is. A domain is drawn with probability ~ weights[d] * n_windows[d] ** alpha; within a
    domain the windows come in a fresh random order each epoch. Depends only on its arguments."""
    names = list(n_windows)
    counts = np.array([n_windows[d] for d in names], dtype=np.float64)
    if (counts == 0).any():
        empty = [d for d, c in zip(names, counts) if c == 0]
        raise ValueError(f"domains {empty} have no training windows (too few tokens for seq_len)")
    unknown = set(weights or {}) - set(names)
    if unknown:
        raise ValueError(f"domain_weights names unknown domains {sorted(unknown)}; domains are {names}")
    p = np.array([batch_schedule_probabilities(n_windows, alpha, weights)[d] for d in names])
    rng = np.random.default_rng([seed, 1])
    dom = rng.choice(len(names), size=steps * batch_size, p=p)
    win = np.empty_like(dom)
    for i, d in enumerate(names):
        where = np.flatnonzero(dom == i)
        n = int(counts[i])
        epochs = -(-len(where) // n) if len(where) else 0
        drng = np.random.default_rng([seed, 2, i])
        order = np.concatenate([drng.permutation(n) for _ in range(epochs)]) if epochs else np.zeros(0, np.int64)
        win[where] = order[:len(where)]
    return np.stack([dom, win], -1).reshape(steps, batch_size, 2)


def batch_schedule_probabilities(n_windows: dict[str, int], alpha: float = 1.0,
                                 weights: dict[str, float] | None = None) -> dict[str, float]:
    """The probability that a training sequence comes from each domain: ~ weights[d] * n_windows[d] ** alpha
    (what :func:`batch_schedule` draws from)."""
    names = list(n_windows)
    p = np.array([float(n_windows[d]) for d in names]) ** alpha * np.array([(weights or {}).get(d, 1.0) for d in names])
    return {d: float(x) for d, x in zip(names, p / p.sum())}


@dataclass
class Dataset:
    """Everything the loop needs: packed windows per domain and the batch schedule."""

    domains: list[str]
    train: dict[str, np.ndarray]  # domain -> [n, T+1]
    heldout: dict[str, np.ndarray]  # domain -> [n, T+1]
    schedule: np.ndarray  # [steps, B, 2]
    bos_id: int
    token_data: TokenData

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        rows = self.schedule[step]
        w = np.stack([self.train[self.domains[d]][i] for d, i in rows])
        x, y = inputs_targets(w, self.bos_id)
        return x, y, rows[:, 0]


def prepare_data(cfg: TrainConfig, out_dir: str | os.PathLike | None, corpus=None, tokenizer=None,
                 progress: bool = True) -> Dataset:
    """Tokenise, pack and schedule: everything the loop reads (see the package docstring, steps 1-3)."""
    if tokenizer is None:
        tokenizer = load_tokenizer()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab_size {cfg.model.vocab_size}")
    if corpus is None:
        corpus = get_corpus(cfg.data, progress=progress)
    cache = Path(out_dir) / "tokens" if out_dir is not None else None
    td = tokenize_corpus(corpus, tokenizer, cache, cfg.data.domains, progress)
    T = cfg.data.seq_len
    train = {d: pack_windows(td, "train", d, T, shuffle_seed=cfg.seed) for d in td.domains}
    max_eval = max(1, cfg.data.eval_tokens_per_domain // T) if cfg.data.eval_tokens_per_domain else None
    heldout = {d: pack_windows(td, "heldout", d, T, max_windows=max_eval) for d in td.domains}
    empty = [d for d, w in heldout.items() if len(w) == 0]
    if empty:
        raise ValueError(f"domains {empty} have fewer than seq_len+1={T + 1} held-out tokens")
    sched = batch_schedule({d: len(w) for d, w in train.items()}, cfg.optim.steps, cfg.optim.batch_size,
                           cfg.seed, cfg.data.domain_alpha, cfg.data.domain_weights)
    return Dataset(td.domains, train, heldout, sched, tokenizer.bos_id, td)


def get_corpus(data: DataConfig, progress: bool = True) -> Corpus:
    """The corpus named by the config: read from ``corpus_dir`` when it was built there with the
    same size and seed, otherwise built (and written to ``corpus_dir`` if given)."""
    if data.corpus_dir is not None:
        d = Path(data.corpus_dir)
        if not d.is_absolute() and not d.exists():
            d = REPO_ROOT / d  # a relative corpus_dir in a config means the repository's
        stats = d / "stats.json"
        if stats.exists():
            meta = json.loads(stats.read_text())
            m = meta.get("meta", meta)
            if (m.get("size") == data.corpus_size and m.get("seed") == data.corpus_seed
                    and bool(m.get("prose")) == (data.prose_dir is not None)):
                return load_corpus(d)
        return build_corpus(out_dir=d, size=data.corpus_size, seed=data.corpus_seed, progress=progress,
                            prose=data.prose_dir)
    return build_corpus(out_dir=None, size=data.corpus_size, seed=data.corpus_seed, progress=progress,
                        prose=data.prose_dir)


def spread(n: int, k: int) -> np.ndarray:
    """k indices evenly spread over range(n) (all of them when k >= n): a sample of held-out
    windows that is not just the first documents of the corpus."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
