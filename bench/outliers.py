"""Massive activations beyond position 0 (issue 12, item 7): per layer, how many included
tokens (position 0 and special tokens already excluded) have a resid_post norm above 10x
the layer's median norm (over the included tokens of the same batch of 8 x 256), and the
share of the layer's centred sum of squares (the FVU denominator) they hold; every token
above 30x is listed. `python` starts with the pydoc topics, so its measurement skips them
and reads the standard library's docstrings.

Uses mlsae's own capture (`mlsae.activations.capture.outliers`), SmolLM2-135M (offline) and
the built-in `pydoc` and `python` text, packed in stream order.

    .venv/bin/python bench/outliers.py --tokens 65536 --out bench/outliers.json
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice

import torch

from mlsae.activations.capture import REPORT_FACTOR, outliers
from mlsae.config import DataConfig
from mlsae.data import TokenSource, batches, include_mask
from mlsae.lm import load_lm


def measure(lm, dataset: str, tokens: int, batch_size: int = 8) -> dict:
    cfg = DataConfig(dataset=dataset, shuffle_buffer=0, holdout_fraction=0.0)
    src = TokenSource(cfg, lm.tokenizer, lm.eos_id)
    n_seq = tokens // cfg.ctx_len
    skip = 0
    if dataset == "python":  # it starts with the pydoc topics: measure the docstrings
        pydoc = TokenSource(DataConfig(dataset="pydoc", shuffle_buffer=0, holdout_fraction=0.0),
                            lm.tokenizer, lm.eos_id)
        skip = sum(1 for _ in pydoc.packed())
    layers = list(range(lm.n_layers))
    L = len(layers)
    count = torch.zeros(L, dtype=torch.long)
    n = 0
    s1 = torch.zeros(L, lm.d_model, dtype=torch.float64)
    s2 = torch.zeros(L, dtype=torch.float64)
    s2_out = torch.zeros(L, dtype=torch.float64)
    max_ratio = torch.zeros(L)
    examples = []
    massive = []
    seqs = islice(src.train_sequences(0), skip, skip + n_seq)
    for b, ids in enumerate(batches(seqs, batch_size)):
        mask = include_mask(ids, lm.special_ids, cfg)
        resid = lm.resid_post(ids, layers)
        over = outliers(resid, mask, REPORT_FACTOR)  # [layer, token]
        x = resid[:, mask].double()  # [layer, token, d]
        norms = x.norm(dim=-1)
        med = norms.median(dim=1, keepdim=True).values
        max_ratio = torch.maximum(max_ratio, (norms / med).max(dim=1).values.float())
        count += over.sum(1)
        n += x.shape[1]
        s1 += x.sum(1)
        sq = (x ** 2).sum(-1)  # [layer, token]
        s2 += sq.sum(1)
        s2_out += (sq * over).sum(1)
        ratio = norms / med  # [layer, token]
        rows, cols = mask.nonzero(as_tuple=True)
        for t in (ratio.max(0).values > 30).nonzero().flatten().tolist():
            r, c = int(rows[t]), int(cols[t])
            massive.append({"batch": b, "row": r, "position": c,
                            "token": lm.tokenizer.decode([int(ids[r, c])]),
                            "context": lm.tokenizer.decode(ids[r, max(0, c - 8):c + 1]),
                            "max_ratio": float(ratio[:, t].max()),
                            "layer_of_max": int(ratio[:, t].argmax())})
        if over.any() and len(examples) < 10:
            rows, cols = mask.nonzero(as_tuple=True)
            for t in over.any(0).nonzero().flatten().tolist()[:3]:
                r, c = int(rows[t]), int(cols[t])
                examples.append({"batch": b, "row": r, "position": c,
                                 "token": lm.tokenizer.decode([int(ids[r, c])]),
                                 "context": lm.tokenizer.decode(ids[r, max(0, c - 8):c + 1]),
                                 "layers": over[:, t].nonzero().flatten().tolist(),
                                 "max_ratio": float((norms[:, t] / med[:, 0]).max())})
    centred = s2 - (s1 ** 2).sum(-1) / n
    # share of the centred sum of squares held by the outlier tokens (uncentred for them: an
    # upper-bound-free approximation, exact when their norm dwarfs the mean)
    share = (s2_out / centred).tolist()
    return {"dataset": dataset, "skipped_sequences": skip, "massive_over_30x": massive,
            "included_tokens": n, "per_layer_count": count.tolist(),
            "tokens_over_any_layer": None, "per_layer_share_of_ss": share,
            "per_layer_max_ratio": max_ratio.tolist(), "examples": examples}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--datasets", default="pydoc,python")
    ap.add_argument("--out", default="bench/outliers.json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_lm("smollm2-135m", "cpu")
    res = []
    for ds in args.datasets.split(","):
        t0 = time.perf_counter()
        r = measure(lm, ds, args.tokens)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        res.append(r)
        print(f"{ds}: {r['included_tokens']} included tokens, {r['seconds']} s", flush=True)
        print("layer count  share_of_SS  max_ratio")
        for i, (c, s, m) in enumerate(zip(r["per_layer_count"], r["per_layer_share_of_ss"],
                                          r["per_layer_max_ratio"])):
            print(f"{i:>5} {c:>5} {s:>11.3f} {m:>10.1f}")
        for e in r["massive_over_30x"]:
            print("  massive (> 30x):", json.dumps(e), flush=True)
        for e in r["examples"]:
            print("  example:", json.dumps(e))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
