"""Documents -> packed token sequences -> batches, and the excluded positions (SPEC §2).

Documents are joined with EOS and cut into `ctx_len` sequences in source order (with
`--prepend-bos`, each sequence is BOS + ctx_len - 1 tokens of text); `include_mask` says
which positions are trained on and counted in metrics. `pack_pieces` packs a resumable
stream of text pieces (`mlsae.data.sources`) incrementally: memory is one piece and one
sequence, and every sequence comes with a `mark` from which packing restarts exactly.
Uses only mlsae.config.
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


def pack_pieces(pieces, tokenizer, eos_id: int, ctx_len: int, bos_id: int | None = None,
                mark: dict | None = None) -> Iterator[tuple[int, Tensor, dict]]:
    """`(j, sequence [ctx_len], mark)` for packed sequence j of a stream of pieces.

    `pieces(state)` yields `(state, text, doc_end)`; the pieces of a document are joined
    without separator (each tokenized on its own) and EOS follows a document that had text.
    `mark` = {"source", "buffer", "j", "has_text"}: the state before the piece that completes
    the sequence, the tokens left over before it, the index of the next sequence and whether
    the current document already had text; passing
    it back restarts packing there (sequences before j are produced again and must be
    skipped by the caller).
    """
    body = ctx_len - (1 if bos_id is not None else 0)
    head = [bos_id] if bos_id is not None else []
    buf = list(mark["buffer"]) if mark else []
    j = int(mark["j"]) if mark else 0
    has_text = bool(mark["has_text"]) if mark else False
    for state, text, end in pieces(mark["source"] if mark else None):
        here = {"source": state, "buffer": list(buf), "j": j, "has_text": has_text}
        if text:
            buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            has_text = True
        if end and has_text:
            buf.append(eos_id)
            has_text = False
        k = 0
        while len(buf) - k >= body:
            yield j, torch.tensor(head + buf[k:k + body], dtype=torch.long), here
            k += body
            j += 1
        if k:
            del buf[:k]


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
