"""Deterministic corpora. Batches depend only on (corpus, seed, split, sizes), never on mode.

- `MarkovCorpus` (the default): a seeded sparse first-order Markov source over the model's
  vocabulary. Its entropy rate is computed exactly from the transition table and its
  stationary distribution, so the optimal loss (`loss_floor`) is known.
- `FileCorpus`: a user file, either raw bytes (any text; vocabulary 256) or a `.bin` file
  of uint16 token ids (nanoGPT's format). The first 90% trains, the last 10% is held out.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

HELD_OUT_FRACTION = 0.1
_SPLIT_STREAM = {"train": 0, "heldout": 1}


def _generator(seed: int, split: str) -> torch.Generator:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split={split!r}: use 'train' or 'heldout'")
    # distinct, reproducible stream per (seed, split)
    return torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_STREAM[split])


class MarkovCorpus:
    """Sparse Markov chain: each token has `branching` possible successors.

    Successor offsets are distinct and nonzero and always include +1 and +2, which makes
    the chain irreducible (the +1 cycle visits every token) and aperiodic (cycles of
    length V and V-1), so the stationary distribution is unique and power iteration finds
    it. Sequences start from that distribution, so every target position has exactly the
    entropy rate as its optimal cross-entropy.
    """

    def __init__(self, vocab_size: int, branching: int = 8, source_seed: int = 1234) -> None:
        if vocab_size <= branching + 1:
            raise ValueError(f"vocab_size={vocab_size}: the Markov corpus needs more than {branching + 1} tokens")
        self.vocab_size = vocab_size
        self.branching = branching
        self.name = f"markov-v{vocab_size}-k{branching}-s{source_seed}"
        g = torch.Generator().manual_seed(source_seed)
        V, k = vocab_size, branching
        # Sorted uniforms u; offset_j = 1 + j + floor(u_j * (V - k)) is strictly increasing in
        # j and lies in [1, V-1]. u_0 = u_1 = 0 pins offsets 1 and 2.
        u = torch.rand(V, k, generator=g, dtype=torch.float64).sort(dim=1).values
        u[:, :2] = 0.0
        offsets = 1 + torch.arange(k) + (u * (V - k)).floor().long()
        self.successors = (torch.arange(V)[:, None] + offsets) % V  # (V, k)
        # Skewed but never tiny probabilities: softmax of Gaussian logits.
        logits = 1.5 * torch.randn(V, k, generator=g, dtype=torch.float64)
        self.probs = torch.softmax(logits, dim=1)  # (V, k), rows sum to 1
        self._cum = self.probs.cumsum(dim=1).float()
        self._cum[:, -1] = 1.0  # guard against rounding below the last draw

    @functools.cached_property
    def stationary(self) -> torch.Tensor:
        """pi with pi = pi P, by power iteration in float64 (V,)."""
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        flat_succ = self.successors.flatten()
        for _ in range(100_000):
            nxt = torch.zeros_like(pi).index_add_(0, flat_succ, (pi[:, None] * self.probs).flatten())
            if (nxt - pi).abs().sum() < 1e-14:
                return nxt
            pi = nxt
        raise RuntimeError(f"{self.name}: stationary distribution did not converge")

    @functools.cached_property
    def loss_floor(self) -> float:
        """Entropy rate in nats/token: sum_i pi_i * H(P_i), the best achievable loss."""
        row_entropy = -(self.probs * self.probs.log()).sum(dim=1)
        return float((self.stationary * row_entropy).sum())

    def batches(self, n: int, batch_size: int, seq_len: int, seed: int, split: str = "train") -> torch.Tensor:
        """n batches of sequences, (n, batch_size, seq_len + 1) int64, on the CPU."""
        g = _generator(seed, split)
        chains = n * batch_size
        out = torch.empty(chains, seq_len + 1, dtype=torch.long)
        state = torch.multinomial(self.stationary, chains, replacement=True, generator=g)
        out[:, 0] = state
        for t in range(1, seq_len + 1):  # all chains advance together
            draw = torch.rand(chains, 1, generator=g)
            pick = torch.searchsorted(self._cum[state], draw).squeeze(1).clamp_(max=self.branching - 1)
            state = self.successors[state, pick]
            out[:, t] = state
        return out.view(n, batch_size, seq_len + 1)


class FileCorpus:
    """Tokens from a file: `.bin` = uint16 token ids, anything else = raw bytes."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data={str(path)!r}: no such file; give a text file or a uint16 .bin token file")
        if path.suffix == ".bin":
            if path.stat().st_size % 2:
                raise ValueError(f"data={str(path)!r}: odd size, not a uint16 token file")
            tokens = np.fromfile(path, dtype=np.uint16)
        else:
            tokens = np.fromfile(path, dtype=np.uint8)
        if tokens.size == 0:
            raise ValueError(f"data={str(path)!r}: the file is empty")
        self.name = f"file:{path.name}"
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.vocab_size = int(self.tokens.max()) + 1 if path.suffix == ".bin" else 256
        self.loss_floor: float | None = None  # unknown for real text
        cut = len(self.tokens) - max(1, math.floor(len(self.tokens) * HELD_OUT_FRACTION))
        self._splits = {"train": self.tokens[:cut], "heldout": self.tokens[cut:]}
        self.path = path

    def check_fits(self, seq_len: int) -> None:
        """ValueError unless both splits hold at least one sequence of seq_len + 1 tokens."""
        for split, toks in self._splits.items():
            if len(toks) < seq_len + 1:
                raise ValueError(
                    f"data={str(self.path)!r}: the {split} split has {len(toks)} tokens, "
                    f"fewer than seq_len + 1 = {seq_len + 1}; use a longer file or a smaller --seq-len"
                )

    def batches(self, n: int, batch_size: int, seq_len: int, seed: int, split: str = "train") -> torch.Tensor:
        """n batches of random windows, (n, batch_size, seq_len + 1) int64."""
        self.check_fits(seq_len)
        toks = self._splits[split]
        g = _generator(seed, split)
        starts = torch.randint(0, len(toks) - seq_len, (n * batch_size,), generator=g)
        windows = starts[:, None] + torch.arange(seq_len + 1)
        return toks[windows].view(n, batch_size, seq_len + 1)


Corpus = MarkovCorpus | FileCorpus


def make_corpus(data: str | None, vocab_size: int) -> Corpus:
    """The synthetic Markov corpus for `None`, else the file; checks the vocabulary fits."""
    if data is None:
        return _markov(vocab_size)
    corpus = FileCorpus(data)
    if corpus.vocab_size > vocab_size:
        raise ValueError(
            f"data={data!r}: token id {corpus.vocab_size - 1} does not fit the model's "
            f"vocabulary of {vocab_size}; use a preset with a larger vocabulary"
        )
    return corpus


@functools.lru_cache(maxsize=4)
def _markov(vocab_size: int) -> MarkovCorpus:
    return MarkovCorpus(vocab_size)


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a data file's bytes (as `sha256sum` prints it), None if it cannot be read.

    What identifies a data file in a record: any spelling of its path gives the same digest, an
    edited file another. Computed once per file version (size and modification time).
    """
    try:
        st = os.stat(path)
        return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except OSError:  # deleted or unreadable since validation: the record says so through its status
        return None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(t: torch.Tensor) -> str:
    """Short content hash of a CPU tensor: equal digests mean identical data."""
    return hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=8).hexdigest()
