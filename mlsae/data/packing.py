"""Documents -> packed token sequences -> batches, and the excluded positions (SPEC §2).

Documents are joined with EOS and cut into `ctx_len` sequences in source order; `include_mask`
says which positions are trained on and counted in metrics. Uses only mlsae.config.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mlsae.config import DataConfig


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
