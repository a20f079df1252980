"""Max-activating examples: a bounded top-N per (latent, layer) kept while streaming
(`TopExamples`), and their SQLite storage (write, add context windows, query). Pure tensors and
sqlite3.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from os import PathLike

import torch
from torch import Tensor


class TopExamples:
    """For every (latent, layer), the ``n_top`` largest activations seen while streaming.

    State (key = latent * L + layer): ``values [n * L, n_top]`` float32 (0 = empty slot; real
    activations are > 0), ``seq`` and ``pos`` int32 (-1 when empty), sorted by value descending
    within a key. Memory 12 * n * L * n_top bytes, independent of the tokens streamed. Each
    update drops candidates not above the key's current n_top-th value, then re-sorts only the
    touched keys' rows together with the surviving candidates (two stable sorts + segment
    ranks). Ties keep the example seen first.
    """

    def __init__(
        self, n_latents: int, n_layers: int, n_top: int = 16, device: torch.device | str = "cpu"
    ):
        self.n_latents, self.n_layers, self.n_top = n_latents, n_layers, n_top
        n_keys = n_latents * n_layers
        self.values = torch.zeros(n_keys, n_top, dtype=torch.float32, device=device)
        self.seq = torch.full((n_keys, n_top), -1, dtype=torch.int32, device=device)
        self.pos = torch.full((n_keys, n_top), -1, dtype=torch.int32, device=device)

    def update(
        self,
        top_idx: Tensor,
        top_acts: Tensor,
        seq_offset: int = 0,
        seq_ids: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add one batch.

        top_idx, top_acts: [layer, batch, seq, k]. A batch row's sequence id is
        ``seq_ids[b]`` if given ([batch] int), else ``seq_offset + b``; ``pos`` is the index
        along ``seq``. mask [batch, seq] (optional) drops excluded positions.
        """
        n_layers, n_batch, n_seq, k = top_idx.shape
        if n_layers != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {n_layers}")
        dev, n_top = self.values.device, self.n_top
        top_idx, top_acts = top_idx.to(dev), top_acts.to(dev)
        layer_pos = torch.arange(n_layers, device=dev).view(-1, 1, 1, 1)
        keys = top_idx * n_layers + layer_pos  # [layer, batch, seq, k]
        # only candidates that beat the current n_top-th value of their key can enter
        # (the threshold is >= 0, so this also drops inactive slots)
        cand = top_acts.float() > self.values[:, -1][keys]
        if mask is not None:
            cand &= mask.to(device=dev, dtype=torch.bool)[None, :, :, None]
        _, b, s, _ = cand.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        c_keys, c_vals = keys[cand], top_acts[cand].float()
        if seq_ids is None:
            seq_ids = torch.arange(seq_offset, seq_offset + n_batch)
        c_seq = seq_ids.to(dev)[b].int()
        c_pos = s.int()

        touched = torch.unique(c_keys)  # [U], sorted
        all_keys = torch.cat([touched.repeat_interleave(n_top), c_keys])
        all_vals = torch.cat([self.values[touched].reshape(-1), c_vals])
        all_seq = torch.cat([self.seq[touched].reshape(-1), c_seq])
        all_pos = torch.cat([self.pos[touched].reshape(-1), c_pos])
        # one stable sort by (key ascending, value descending): the bits of a float32 >= 0 read
        # as int32 are monotonic in its value, so pack key * 2^31 + (2^31 - 1 - bits) in int64
        bits = all_vals.view(torch.int32).long()
        order = (all_keys * 2**31 + (2**31 - 1 - bits)).argsort(stable=True)
        all_keys = all_keys[order]
        counts = torch.unique_consecutive(all_keys, return_counts=True)[1]  # [U], >= n_top each
        starts = counts.cumsum(0) - counts
        rank = torch.arange(all_keys.numel(), device=dev) - starts.repeat_interleave(counts)
        keep = rank < n_top  # every touched row gets all n_top slots rewritten
        k_keys, k_rank, k_ord = all_keys[keep], rank[keep], order[keep]
        self.values[k_keys, k_rank] = all_vals[k_ord]
        self.seq[k_keys, k_rank] = all_seq[k_ord]
        self.pos[k_keys, k_rank] = all_pos[k_ord]

    def get(self, latent: int, layer: int) -> list[tuple[float, int, int]]:
        """[(activation, seq, pos)] for one (latent, layer position), best first."""
        key = latent * self.n_layers + layer
        v, sq, p = self.values[key], self.seq[key], self.pos[key]
        return [(v[i].item(), int(sq[i]), int(p[i])) for i in range(self.n_top) if v[i] > 0]

    def to_sqlite(
        self,
        db_path: str | PathLike[str],
        layer_ids: Sequence[int] | None = None,
        chunk: int = 1 << 20,
    ) -> int:
        """Write the examples to table ``examples`` (replacing it); returns the row count.

        Columns: latent, layer, rank (0 = largest), activation, seq, pos, and nullable
        context_tokens (JSON list of token ids), context_acts (JSON list of floats),
        context_start (position of context_tokens[0] in the sequence), filled later with
        ``update_contexts``. ``layer`` is the layer position, or ``layer_ids[position]`` when
        given (e.g. the LM block numbers). Index on (latent, layer).
        """
        layer_map = torch.tensor(
            list(layer_ids) if layer_ids is not None else range(self.n_layers), dtype=torch.int64
        )
        con = sqlite3.connect(db_path)
        try:
            con.execute("DROP TABLE IF EXISTS examples")
            con.execute(
                "CREATE TABLE examples(latent INTEGER NOT NULL, layer INTEGER NOT NULL,"
                " rank INTEGER NOT NULL, activation REAL NOT NULL, seq INTEGER NOT NULL,"
                " pos INTEGER NOT NULL, context_tokens TEXT, context_acts TEXT,"
                " context_start INTEGER)"
            )
            values, seq, pos = self.values.cpu(), self.seq.cpu(), self.pos.cpu()
            n_rows = 0
            rows_per_chunk = max(chunk // self.n_top, 1)
            for s in range(0, values.shape[0], rows_per_chunk):
                v = values[s : s + rows_per_chunk]
                key, rank = (v > 0).nonzero(as_tuple=True)
                key_g = key + s
                lat, lay = key_g // self.n_layers, layer_map[key_g % self.n_layers]
                cols = (lat, lay, rank, v[key, rank].double(), seq[key_g, rank], pos[key_g, rank])
                rows = list(zip(*(c.tolist() for c in cols)))
                con.executemany(
                    "INSERT INTO examples(latent, layer, rank, activation, seq, pos)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                n_rows += len(rows)
            con.execute("CREATE INDEX examples_latent_layer ON examples(latent, layer)")
            con.commit()
        finally:
            con.close()
        return n_rows


def example_locations(db_path: str | PathLike[str]) -> list[tuple[int, int, int, int, int]]:
    """All (latent, layer, rank, seq, pos) rows ordered by (seq, pos), so a caller can re-stream
    the needed sequences once to build context windows."""
    con = sqlite3.connect(db_path)
    try:
        return con.execute(
            "SELECT latent, layer, rank, seq, pos FROM examples ORDER BY seq, pos"
        ).fetchall()
    finally:
        con.close()


def update_contexts(
    db_path: str | PathLike[str],
    updates: Iterable[tuple[int, int, int, Sequence[int], Sequence[float], int]],
) -> None:
    """Fill context columns: each update is (latent, layer, rank, context_tokens, context_acts,
    context_start), with context_acts the (latent, layer) activation at each context token."""
    con = sqlite3.connect(db_path)
    try:
        con.executemany(
            "UPDATE examples SET context_tokens = ?, context_acts = ?, context_start = ?"
            " WHERE latent = ? AND layer = ? AND rank = ?",
            (
                (
                    json.dumps([int(t) for t in toks]),
                    json.dumps([float(a) for a in acts]),
                    int(start),
                    int(lat),
                    int(lay),
                    int(rank),
                )
                for lat, lay, rank, toks, acts, start in updates
            ),
        )
        con.commit()
    finally:
        con.close()


def query_examples(db_path: str | PathLike[str], latent: int, layer: int) -> list[dict]:
    """Examples for one (latent, layer) ordered by rank, as dicts with the table's columns
    (context_tokens / context_acts decoded from JSON, None when not filled yet)."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute(
            "SELECT * FROM examples WHERE latent = ? AND layer = ? ORDER BY rank",
            (latent, layer),
        ).fetchall()
    finally:
        con.close()
    out = []
    for r in rows:
        d = dict(r)
        for c in ("context_tokens", "context_acts"):
            d[c] = json.loads(d[c]) if d[c] is not None else None
        out.append(d)
    return out
