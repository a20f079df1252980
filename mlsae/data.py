"""Text sources -> packed token sequences -> train / held-out batches with excluded positions.

Documents are joined with EOS and cut into `ctx_len` sequences in source order. Packed
sequence j is held out iff crc32(j) / 2^32 < holdout_fraction, so the split is fixed for a
given source and tokenizer, independent of the seed, and never trained on.

Local sources (pydoc, files) are tokenized once into memory and reshuffled every epoch; hub
datasets stream in order (no full download) and restart when exhausted.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlsae.config import DataConfig
from mlsae.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def is_holdout(seq_index: int, fraction: float) -> bool:
    return zlib.crc32(str(seq_index).encode()) / 2**32 < fraction


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not valid JSON") from None
                if text_column not in row:
                    raise UserError(
                        f"{path}:{n}: no text column {text_column!r} "
                        f"(columns: {', '.join(row)}); set --text-column"
                    )
                yield str(row[text_column])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise UserError(
                f"{path}: no text column {text_column!r} "
                f"(columns: {', '.join(table.column_names)}); set --text-column"
            )
        yield from (str(t) for t in table.column(text_column).to_pylist())


def local_documents(spec: str, text_column: str) -> list[str] | None:
    """Documents of `pydoc` or a local file/folder, or None if `spec` is not local."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"--dataset {spec!r}: folder has no .txt/.jsonl/.parquet files")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(f"--dataset {spec!r}: expected a .txt, .jsonl or .parquet file")
        files = [path]
    elif path.suffix in TEXT_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"--dataset {spec!r}: no such file or folder")
    else:
        return None
    return [doc for p in files for doc in _read_file(p, text_column)]


def hub_documents(spec: str, split: str, text_column: str) -> Iterator[str]:
    """Stream documents of a `datasets` hub dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split, streaming=True)
        first = next(iter(ds))
    except StopIteration:
        return
    except Exception as e:  # datasets raises many types for a missing or unreachable id
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open dataset {spec!r} split {split!r}: {first_line}") from None
    if text_column not in first:
        raise UserError(
            f"dataset {spec!r} has no text column {text_column!r} "
            f"(columns: {', '.join(first)}); set --text-column"
        )
    for row in ds:
        yield str(row[text_column])


def pack(docs, tokenizer, eos_id: int, ctx_len: int) -> Iterator[Tensor]:
    """Join documents with EOS and cut into `[ctx_len]` sequences (the tail is dropped)."""
    buf: list[int] = []
    for doc in docs:
        if not doc:
            continue
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        buf.append(eos_id)
        while len(buf) >= ctx_len:
            yield torch.tensor(buf[:ctx_len], dtype=torch.long)
            del buf[:ctx_len]


def include_mask(input_ids: Tensor, special_ids: list[int], cfg: DataConfig) -> Tensor:
    """`[batch, seq]` bool: positions that are trained on and counted in metrics."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if cfg.exclude_special and special_ids:
        mask &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    mask[:, : cfg.exclude_first] = False
    return mask


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


def batches(seqs: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Group sequences into `[batch, ctx_len]` tensors (the last partial batch is kept)."""
    buf: list[Tensor] = []
    for s in seqs:
        buf.append(s)
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)
