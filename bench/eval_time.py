"""Wall time of `mlsae eval` (mlsae.evaluate.evaluate) on a run, repeated, with the median.

The LM loads once and is passed in, so each repeat times only the evaluation itself (text,
SAE, the per-layer splices and, with --replace, the multi-layer replacement). The machine is
shared, so single timings are noisy: report the median of --repeats.

    .venv/bin/python bench/eval_time.py RUN --tokens 512 --batch-size 2 --repeats 3
    .venv/bin/python bench/eval_time.py RUN --tokens 512 --replace all
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replace", default=None)
    args = p.parse_args()

    import torch

    from mlsae.evaluate import evaluate
    from mlsae.options import TextOptions
    from mlsae.runs import load_run_lm, load_sae

    opts = TextOptions(tokens=args.tokens, batch_size=args.batch_size, device="cpu")
    lm = load_run_lm(load_sae(args.run), opts)
    kw = {"replace": args.replace} if args.replace else {}
    if kw and "replace" not in inspect.signature(evaluate).parameters:
        raise SystemExit("this evaluate() has no replace argument")
    times, res = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = evaluate(args.run, opts, out=Path(tmp) / "e.json", lm=lm, progress=False, **kw)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"tokens": res["tokens"], "ce_positions": res["ce_positions"],
                      "layers": len(res["layers"]), "threads": torch.get_num_threads(),
                      "replace": args.replace, "seconds": [round(t, 2) for t in times],
                      "median_s": round(statistics.median(times), 2),
                      "mean_dce": res["mean"]["dce"], "mean_kl": res["mean"]["kl"],
                      "replacement": res.get("replacement", {}).get("dce")}))


if __name__ == "__main__":
    main()
