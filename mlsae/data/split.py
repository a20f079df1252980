"""Packed sequences of a dataset split into train and held-out (`TokenSource`).

Packed sequence j is held out iff crc32(j) / 2^32 < holdout_fraction, so the split is fixed
for a given source and tokenizer, independent of the seed, and never trained on. Local
sources (pydoc, files) are tokenized once into memory and reshuffled every epoch; hub datasets
stream in order (no full download) and restart when exhausted.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.config import DataConfig
from mlsae.data.packing import pack
from mlsae.data.sources import hub_documents, local_documents
from mlsae.errors import UserError


def is_holdout(seq_index: int, fraction: float) -> bool:
    return zlib.crc32(str(seq_index).encode()) / 2**32 < fraction


@dataclass
class TokenSource:
    """Packed sequences of one dataset, split into train and held-out."""

    cfg: DataConfig
    tokenizer: object
    eos_id: int
    seed: int = 0

    def __post_init__(self):
        self._local = local_documents(self.cfg.dataset, self.cfg.text_column)
        self._eval_local = None
        if self.cfg.eval_dataset is not None:
            self._eval_local = local_documents(self.cfg.eval_dataset, self.cfg.text_column)
        self._cache: dict[str, Tensor] = {}

    def _sequences(self, spec: str, local) -> Iterator[tuple[int, Tensor]]:
        docs = local if local is not None else hub_documents(
            spec, self.cfg.split, self.cfg.text_column
        )
        yield from enumerate(pack(docs, self.tokenizer, self.eos_id, self.cfg.ctx_len))

    def _split(self, want_holdout: bool) -> Iterator[Tensor]:
        frac = 0.0 if self.cfg.eval_dataset is not None else self.cfg.holdout_fraction
        for j, seq in self._sequences(self.cfg.dataset, self._local):
            if is_holdout(j, frac) == want_holdout:
                yield seq

    def _local_split(self, name: str, want_holdout: bool) -> Tensor:
        """All train or held-out sequences of a local source, `[n_seq, ctx_len]`."""
        if name not in self._cache:
            seqs = list(self._split(want_holdout))
            self._cache[name] = (
                torch.stack(seqs) if seqs else torch.empty(0, self.cfg.ctx_len, dtype=torch.long)
            )
        return self._cache[name]

    def train_sequences(self, start: int = 0) -> Iterator[Tensor]:
        """Endless train sequences from position `start` of the (epoch-shuffled) order."""
        if self._local is not None:
            data = self._local_split("train", False)
            n = len(data)
            if n == 0:
                raise UserError(
                    f"--dataset {self.cfg.dataset!r} gives no training sequence of "
                    f"{self.cfg.ctx_len} tokens"
                )
            epoch, pos = divmod(start, n)
            while True:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(n, generator=g)
                for i in order[pos:].tolist():
                    yield data[i]
                epoch, pos = epoch + 1, 0
        skipped, produced = 0, False
        while True:
            for seq in self._split(False):
                produced = True
                if skipped < start:
                    skipped += 1
                    continue
                yield seq
            if not produced:
                raise UserError(
                    f"--dataset {self.cfg.dataset!r} gives no training sequence of "
                    f"{self.cfg.ctx_len} tokens"
                )

    def eval_sequences(self, max_tokens: int) -> Tensor:
        """Held-out sequences, up to `max_tokens` tokens, `[n_seq, ctx_len]`."""
        n_max = max(1, int(max_tokens) // self.cfg.ctx_len)
        if self.cfg.eval_dataset is not None:
            seqs = self._sequences(self.cfg.eval_dataset, self._eval_local)
            out = [s for _, s in _take(seqs, n_max)]
        elif self._local is not None:
            return self._local_split("holdout", True)[:n_max]
        else:
            out = list(_take(self._split(True), n_max))
        if not out:
            return torch.empty(0, self.cfg.ctx_len, dtype=torch.long)
        return torch.stack(out)


def _take(it, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x
