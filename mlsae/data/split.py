"""Packed sequences of a dataset split into train and held-out (`TokenSource`), streamed.

Packed sequence j (of the run's own packing: its tokenizer, --ctx-len, --prepend-bos) is held
out iff crc32(j) / 2^32 < holdout_fraction, so the split is fixed for a given source and
tokenizer, independent of the seed, and never trained on. Every source streams (memory does
not depend on its size) and every epoch re-reads it.

Shuffling: the train sequences are taken in consecutive blocks of `--shuffle-buffer`
sequences and each block is permuted with a generator seeded by (seed, epoch, block); 0 keeps
the stream order. A run folder records where each block starts (`data_index.jsonl`: the
position in the train stream and the source state), so a resume re-reads one block, not the
stream before it. Configs written before --shuffle-buffer existed (None) keep their old order:
local sources permuted whole every epoch, hub datasets in order. A block that holds a whole
epoch is permuted exactly as that old full permutation, so small corpora (pydoc) keep their
order. Uses config, packing and sources.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from mlsae.config import DataConfig
from mlsae.data.packing import pack_pieces
from mlsae.data.sources import HubDataset, open_source
from mlsae.errors import UserError

INDEX_EVERY = 1024  # train sequences between resume points when the order is not shuffled


def is_holdout(seq_index: int, fraction: float) -> bool:
    return zlib.crc32(str(seq_index).encode()) / 2**32 < fraction


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first by default (the model family's convention)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer that cannot encode on its own: assume no BOS
        return False
    return bool(ids) and ids[0] == bos


def resolve_prepend_bos(cfg: DataConfig, tokenizer) -> bool:
    return bool(cfg.prepend_bos) if cfg.prepend_bos is not None else adds_bos(tokenizer)


@dataclass
class TokenSource:
    """Packed sequences of one dataset, split into train and held-out."""

    cfg: DataConfig
    tokenizer: object
    eos_id: int
    seed: int = 0

    def __post_init__(self):
        c = self.cfg
        self.source = open_source(c.dataset, c.text_column, c.split, c.dataset_config,
                                  c.data_files)
        self.source.check()
        self.eval_source = None
        if c.eval_dataset is not None:
            self.eval_source = open_source(c.eval_dataset, c.text_column, c.split)
            self.eval_source.check()
        self.bos_id = None
        if resolve_prepend_bos(c, self.tokenizer):
            self.bos_id = getattr(self.tokenizer, "bos_token_id", None)
            if self.bos_id is None:
                raise UserError("--prepend-bos: the tokenizer has no BOS token")

    def packed(self, source=None, mark: dict | None = None):
        """(j, sequence, mark) of the whole packing of `source` (default: --dataset)."""
        return pack_pieces((source or self.source).pieces, self.tokenizer, self.eos_id,
                           self.cfg.ctx_len, self.bos_id, mark)

    @property
    def train_fraction_held(self) -> float:
        return 0.0 if self.cfg.eval_dataset is not None else self.cfg.holdout_fraction

    def _block(self) -> tuple[float, bool]:
        """(sequences per block, shuffled)."""
        size = self.cfg.shuffle_buffer
        if size is None:  # configs from before --shuffle-buffer: the old order
            return (INDEX_EVERY, False) if isinstance(self.source, HubDataset) else (math.inf,
                                                                                    True)
        return (size, True) if size > 0 else (INDEX_EVERY, False)

    def train_sequences(self, start: int = 0, index: str | Path | None = None,
                        record: bool = True) -> Iterator[Tensor]:
        """Endless train sequences from position `start` of the (block-shuffled) order.

        `index`: a run's `data_index.jsonl`; resume points are read from it (a resume
        re-packs one block) and, with `record`, appended to it (by one rank only). Without a
        resume point at or before `start`, the stream is re-read from the beginning and
        skipped, which gives the same sequences."""
        frac = self.train_fraction_held
        size, shuffle = self._block()
        epoch = block = pos = j0 = 0
        mark = None
        entry = read_resume_point(index, start) if start > 0 else None
        if entry is not None:
            epoch, block, pos, j0, mark = (entry["epoch"], entry["block"], entry["position"],
                                           entry["j"], entry["mark"])
        written = last_resume_point(index)
        ever = pos > 0
        while True:
            seqs = _train_only(self.packed(mark=mark), j0, frac)
            mark, j0 = None, 0
            while True:
                chunk = list(islice(seqs, None if size == math.inf else int(size)))
                if not chunk:
                    break
                ever = True
                if record and index is not None and pos > 0 and (written is None or pos > written):
                    _append(index, {"position": pos, "epoch": epoch, "block": block,
                                    "j": chunk[0][0], "mark": chunk[0][2]})
                    written = pos
                if pos + len(chunk) > start:
                    if shuffle:
                        g = torch.Generator().manual_seed(
                            self.seed * 100_003 + epoch + block * 1_000_003)
                        order = torch.randperm(len(chunk), generator=g).tolist()
                    else:
                        order = range(len(chunk))
                    for i in order:
                        if pos >= start:
                            yield chunk[i][1]
                        pos += 1
                else:
                    pos += len(chunk)
                block += 1
            if not ever:
                raise UserError(f"--dataset {self.cfg.dataset!r} gives no training sequence "
                                f"of {self.cfg.ctx_len} tokens")
            epoch, block = epoch + 1, 0

    def eval_sequences(self, max_tokens: int) -> Tensor:
        """Held-out sequences (or the --eval-dataset's), up to `max_tokens` tokens,
        `[n_seq, ctx_len]`, in stream order."""
        n_max = max(1, int(max_tokens) // self.cfg.ctx_len)
        if self.eval_source is not None:
            seqs = (s for _, s, _ in self.packed(self.eval_source))
        else:
            frac = self.cfg.holdout_fraction
            seqs = (s for j, s, _ in self.packed() if is_holdout(j, frac))
        out = list(islice(seqs, n_max))
        if not out:
            return torch.empty(0, self.cfg.ctx_len, dtype=torch.long)
        return torch.stack(out)

    def heldout_runs(self) -> Iterator[Tensor]:
        """Maximal runs of consecutive held-out sequences of this packing, each concatenated
        into one `[n * ctx_len]` token stream (contiguous held-out text), in stream order."""
        frac, cur, prev = self.cfg.holdout_fraction, [], -2
        for j, s, _ in self.packed():
            if not is_holdout(j, frac):
                continue
            if j != prev + 1 and cur:
                yield torch.cat(cur)
                cur = []
            cur.append(s)
            prev = j
        if cur:
            yield torch.cat(cur)


def _train_only(packed, j0: int, frac: float):
    for j, s, m in packed:
        if j >= j0 and not is_holdout(j, frac):
            yield j, s, m


# ---- resume points (a run's data_index.jsonl) ----------------------------------------------
def _entries(index) -> list[dict]:
    if index is None or not Path(index).is_file():
        return []
    out = []
    for line in Path(index).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written by another rank
            continue
    return out


def read_resume_point(index, start: int) -> dict | None:
    """The recorded block start at or before train-stream position `start` (the latest)."""
    best = None
    for e in _entries(index):
        if e["position"] <= start and (best is None or e["position"] > best["position"]):
            best = e
    return best


def last_resume_point(index) -> int | None:
    positions = [e["position"] for e in _entries(index)]
    return max(positions) if positions else None


def _append(index, entry: dict) -> None:
    path = Path(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
