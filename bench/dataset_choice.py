"""Which built-in text should the default run train on? Scores two runs (one trained with
`--dataset pydoc`, one with `--dataset python`, same setup and tokens) in float32 on three
texts: each dataset's held-out split, and a text neither trained on.

    mlsae train --dataset pydoc --tokens 300000 --out runs/ds-pydoc
    mlsae train --dataset python --tokens 300000 --out runs/ds-python
    python bench/dataset_choice.py runs/ds-pydoc runs/ds-python --unseen readmes.txt

`--unseen`: a .txt file (default: the Debian package READMEs under /usr/share/doc,
concatenated); its first 48 packed sequences are scored. Prints one line per (run, text).
"""

from __future__ import annotations

import argparse
import gzip
import types
from dataclasses import replace
from pathlib import Path

import torch

from mlsae.config import RunConfig
from mlsae.data import TokenSource
from mlsae.lm import load_lm
from mlsae.runs import load_sae
from mlsae.train.loop import heldout_summaries


def debian_readmes(out: Path) -> Path:
    files = sorted(p for p in Path("/usr/share/doc").glob("*/README*.gz")
                   if p.stat().st_size > 3000)[:60]
    out.write_text("\n".join(gzip.open(p, "rt", errors="replace").read() for p in files))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders to compare")
    ap.add_argument("--unseen", help="a .txt no run trained on (default: Debian READMEs)")
    args = ap.parse_args()
    saes = {r: load_sae(r) for r in args.runs}
    cfgs = {r: RunConfig.from_dict(s.config["run"]) for r, s in saes.items()}
    lm = load_lm(cfgs[args.runs[0]].train.model, "cpu", "float32")
    trainers = [types.SimpleNamespace(sae=s, layers=s.config["layers"], cfg=cfgs[r],
                                      device=torch.device("cpu"), n_latents=s.n_latents)
                for r, s in saes.items()]
    texts = {}
    for c in cfgs.values():  # each run's own held-out split
        texts[f"{c.data.dataset} held-out"] = TokenSource(c.data, lm.tokenizer, lm.eos_id,
                                                          seed=c.train.seed)
    unseen = Path(args.unseen) if args.unseen else debian_readmes(Path("/tmp/readmes.txt"))
    lead = cfgs[args.runs[0]].data
    data = replace(lead, dataset=str(unseen), eval_dataset=None, holdout_fraction=0.0,
                   python_version=None)
    src = TokenSource(data, lm.tokenizer, lm.eos_id, seed=0)
    seqs = torch.stack([s for _, s in zip(range(48), src.train_sequences(0))])
    src.eval_sequences = lambda _n: seqs  # all of it: no run trained on this text
    texts[f"unseen {unseen.name}"] = src
    for name, source in texts.items():
        for r, res in zip(saes, heldout_summaries(trainers, lm, source, 10**9, progress=False)):
            print(f"{r} on {name}: FVU {res['mean']['fvu']:.4f} over {res['tokens']} tokens",
                  flush=True)


if __name__ == "__main__":
    main()
