"""What the default trainer recovers from the default synthetic cache (issue 14 item 4).

    python bench/synth_recovery.py --out /tmp/synth-bench [--k 32 8]

Writes the cache (`mlsae synth` defaults), trains one run per --k with every other option at
its default (`mlsae train --activations CACHE --eval-tokens 0 --k K`), scores each with
`mlsae synth-score` and prints one table: recovery (fraction of true directions with a decoder
row at cosine > 0.9), held-out FVU, and the analysis statistics of the SAE's codes next to the
known truth on the same held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.synth import SynthSpec, format_score, synth_score, write_synth
from mlsae.train import RunConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[32])
    p.add_argument("--score-tokens", type=int, default=16_384)
    args = p.parse_args()
    out = Path(args.out)
    cache = out / "cache"
    t0 = time.perf_counter()
    if not (cache / "manifest.json").exists():
        write_synth(cache, SynthSpec())
    print(f"cache: {time.perf_counter() - t0:.1f} s")
    results = {}
    for k in args.k:
        run = out / f"run-k{k}"
        t0 = time.perf_counter()
        if not (run / "config.json").exists():
            train(RunConfig(SAEConfig(k=k), DataConfig(),
                            TrainConfig(activations=str(cache), out=str(run), eval_tokens=0)),
                  progress=False)
        seconds = time.perf_counter() - t0
        res = synth_score(run, cache, tokens=args.score_tokens)
        res["train_seconds"] = round(seconds, 1)
        results[k] = res
        print(f"\n== k {k} (default trainer otherwise; {seconds:.0f} s)")
        print(format_score(res))
    (out / "synth_recovery.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
