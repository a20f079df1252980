"""`mlsae examples`: max-activating examples per (latent, layer), with context (SPEC §5).
Uses codes and top_examples.

Collect: the run's held-out text (or --dataset) is streamed once into `TopExamples`, which
keeps the --top largest activations of every (latent, layer) (memory 12 * n_latents * layers
* top bytes, independent of --tokens). Only the token ids of the streamed sequences are kept;
afterwards the sequences that hold an example are encoded again to read each example's
window: up to --window tokens before and after the max token, clipped to its sequence, with
the activation of that latent at that layer on every window token (0 at excluded positions).

`<run>/analysis/examples.sqlite` (written to a temporary file, then renamed):
  examples  latent, layer (LM block), rank (0 = largest), activation, seq (index of the
            sequence in the streamed text), pos (position in it), context_tokens (JSON token
            ids), context_acts (JSON activations, 4 decimals), context_start (position of
            context_tokens[0]); index on (latent, layer)
  vocab     token_id, text: each context token decoded on its own
  meta      key, value (JSON): run, model, dataset, layers, n_latents, top, window, tokens,
            ctx_len

Show: `mlsae examples RUN --show LATENT [--layer BLOCK]` prints the examples with the max
token marked «like this»; `show_examples` is the Python equivalent.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.codes import (
    RUN_HELP,
    RunCodes,
    analysis_dir,
    open_run,
    require_run_dir,
    token_strings,
)
from mlsae.analysis.top_examples import TopExamples, query_examples, update_contexts
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions, add_text_options, text_options

DB_NAME = "examples.sqlite"
MARK = ("«", "»")
ACT_DECIMALS = 4  # context activations are for display: 4 decimals keep the file small


def collect(codes: RunCodes, batch_list: list[Tensor], top: int, progress: bool = True
            ) -> TopExamples:
    ex = TopExamples(codes.sae.n_latents, codes.n_layers, top, device=codes.stats_device)
    for offset, _, acts, idx, mask in codes.stream(batch_list, "examples", progress):
        ex.update(idx, acts, seq_offset=offset, mask=mask)
    return ex


def context_windows(codes: RunCodes, ex: TopExamples, seqs: Tensor, window: int,
                    batch_size: int, progress: bool = True
                    ) -> Iterator[tuple[int, int, int, list[int], list[float], int]]:
    """(latent, layer block, rank, window token ids, window activations, window start) for
    every stored example; `seqs [n_seq, ctx_len]` are the streamed sequences. Only the
    sequences holding an example are encoded again, `batch_size` at a time."""
    n_layers, ctx_len = ex.n_layers, seqs.shape[1]
    key, rank = (ex.values > 0).nonzero(as_tuple=True)  # [m] each
    seq, pos = ex.seq[key, rank].long(), ex.pos[key, rank].long()
    order = seq.argsort(stable=True)  # examples grouped by sequence
    key, rank, seq, pos = key[order], rank[order], seq[order], pos[order]
    latent, lpos = key // n_layers, key % n_layers
    slots = torch.arange(2 * window + 1, device=seq.device)  # [W]
    needed = torch.unique(seq)
    for chunk in tqdm(needed.split(batch_size), desc="contexts", disable=not progress,
                      dynamic_ncols=True):
        ids = seqs[chunk.cpu()]  # [b, ctx_len]
        acts, idx, _ = codes.encode(ids)  # [layer, b, ctx_len, k]
        acts, idx = acts.to(seq.device), idx.to(seq.device)
        lo = int(torch.searchsorted(seq, chunk[0]))
        s = slice(lo, int(torch.searchsorted(seq, chunk[-1], right=True)))
        b = torch.searchsorted(chunk, seq[s])[:, None]  # row in this chunk [m, 1]
        first = pos[s] - window  # window slot j is position first + j (may be outside)
        p = (first[:, None] + slots).clamp(0, ctx_len - 1)  # [m, W]
        lp = lpos[s, None]
        hit = idx[lp, b, p] == latent[s, None, None]  # [m, W, k]
        win = (acts[lp, b, p] * hit).sum(-1).double()  # [m, W]
        win = (torch.round(win * 10**ACT_DECIMALS) / 10**ACT_DECIMALS).cpu().tolist()
        toks = ids[b.cpu(), p.cpu()].tolist()
        start = first.clamp_min(0)
        cut_lo = (start - first).tolist()  # slots before position 0 / after the end are cut
        cut_hi = ((pos[s] + window + 1).clamp_max(ctx_len) - first).tolist()
        rows = zip(latent[s].tolist(), lpos[s].tolist(), rank[s].tolist(), toks, win,
                   start.tolist(), cut_lo, cut_hi)
        for lat, lay, r, t, a, st, c0, c1 in rows:
            yield lat, codes.layers[lay], r, t[c0:c1], a[c0:c1], st


def _write_tables(db: Path, meta: dict, vocab: dict[int, str]) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.executemany("INSERT INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in meta.items()])
        con.execute("CREATE TABLE vocab(token_id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        con.executemany("INSERT INTO vocab VALUES (?, ?)", sorted(vocab.items()))
        con.commit()
    finally:
        con.close()


def collect_examples(run: str | Path, opts: TextOptions, top: int = 32, window: int = 8,
                     lm: LanguageModel | None = None, progress: bool = True) -> dict:
    """Collect and store the examples (module docstring). Returns {"out", "rows", "keys",
    "tokens"}: the database path, examples stored, (latent, layer) pairs with an example."""
    if top <= 0 or window < 0:
        raise UserError("--top must be positive and --window non-negative")
    codes = open_run(run, opts, lm)
    batch_list, tokens = codes.text()
    ex = collect(codes, batch_list, top, progress)
    db = analysis_dir(codes.run_dir) / DB_NAME
    tmp = db.with_name(f".{DB_NAME}.tmp")
    tmp.unlink(missing_ok=True)
    rows = ex.to_sqlite(tmp, layer_ids=codes.layers)
    seqs = torch.cat(batch_list)  # [n_seq, ctx_len]: token ids only
    update_contexts(tmp, context_windows(codes, ex, seqs, window, opts.batch_size, progress))
    used = torch.unique(seqs).tolist()
    meta = {"run": str(run), "model": codes.lm.name,
            "dataset": codes.data_cfg.eval_dataset
            or f"{codes.data_cfg.dataset} (held-out split)",
            "layers": codes.layers, "n_latents": codes.sae.n_latents, "top": top,
            "window": window, "tokens": tokens, "ctx_len": codes.data_cfg.ctx_len}
    _write_tables(tmp, meta, dict(zip(used, token_strings(codes.lm.tokenizer, used))))
    os.replace(tmp, db)
    return {"out": str(db), "rows": rows, "keys": int((ex.values[:, 0] > 0).sum()),
            "tokens": tokens}


# ---- query -----------------------------------------------------------------------------------
def examples_db(run: str | Path) -> Path:
    db = require_run_dir(run) / "analysis" / DB_NAME
    if not db.is_file():
        raise UserError(f"{str(db)!r} does not exist: run `mlsae examples {run}` first")
    return db


def read_meta(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    finally:
        con.close()


def _vocab(db: Path) -> dict[int, str]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT token_id, text FROM vocab"))
    finally:
        con.close()


def show_examples(run: str | Path, latent: int, layer: int | None = None) -> list[dict]:
    """Stored examples of `latent` at LM block `layer` (default: every layer of the SAE),
    by layer then rank. Each dict has the `examples` columns plus `tokens` (strings of the
    window) and `max_index` (index of the max token in the window)."""
    db = examples_db(run)
    meta = read_meta(db)
    n, layers = meta["n_latents"], meta["layers"]
    if not 0 <= latent < n:
        raise UserError(f"latent {latent} does not exist (the SAE has latents 0..{n - 1})")
    if layer is not None and layer not in layers:
        raise UserError(f"--layer {layer} is not a layer of the SAE (its layers: "
                        f"{', '.join(map(str, layers))})")
    vocab = _vocab(db)
    out = []
    for lay in [layer] if layer is not None else layers:
        for ex in query_examples(db, latent, lay):
            ex["tokens"] = [vocab[t] for t in ex["context_tokens"]]
            ex["max_index"] = ex["pos"] - ex["context_start"]
            out.append(ex)
    return out


def mark_max(tokens: list[str], max_index: int) -> str:
    """The window as one line of text, the max token in «»; newlines shown as \\n."""
    text = "".join(f"{MARK[0]}{t}{MARK[1]}" if i == max_index else t
                   for i, t in enumerate(tokens))
    return text.replace("\r", "\\r").replace("\n", "\\n")


def format_example(ex: dict) -> str:
    return (f"layer {ex['layer']:>3}  #{ex['rank']:<3} act {ex['activation']:8.4f}  "
            f"seq {ex['seq']:>5} pos {ex['pos']:>4}  {mark_max(ex['tokens'], ex['max_index'])}")


def _cmd_examples(args: argparse.Namespace) -> int:
    if args.show is None:
        if args.layer is not None:
            raise UserError("--layer only applies with --show")
        res = collect_examples(args.run, text_options(args), args.top, args.window)
        print(f"wrote {res['rows']} examples of {res['keys']} (latent, layer) pairs from "
              f"{res['tokens']} tokens to {res['out']}")
        return 0
    found = show_examples(require_run_dir(args.run, args.model), args.show, args.layer)
    where = f"layer {args.layer}" if args.layer is not None else "any layer"
    if not found:
        print(f"latent {args.show} has no example at {where} (it never fired there in the "
              "streamed text)")
    for ex in found:
        print(format_example(ex))
    return 0


def add_commands(sub) -> None:
    """Register `mlsae examples` on the subparsers object `sub`."""
    p = sub.add_parser(
        "examples", help="top activating examples per (latent, layer), or show a latent's",
        description="Without --show: stream the run's held-out text (or --dataset) and store "
        "the --top largest activations of every (latent, layer) with a context window in "
        "<run>/analysis/examples.sqlite. With --show: print a latent's stored examples, the "
        "max token marked «like this».")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--top", type=int, default=32,
                   help="examples kept per (latent, layer) (default: 32)")
    p.add_argument("--window", type=int, default=8,
                   help="context tokens kept on each side of the max token (default: 8)")
    p.add_argument("--show", type=int, metavar="LATENT", help="print this latent's examples")
    p.add_argument("--layer", type=int, help="with --show: only this LM layer (block number)")
    add_text_options(p)
    p.set_defaults(func=_cmd_examples)
