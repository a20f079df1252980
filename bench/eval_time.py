"""Wall time of `mlsae eval` (mlsae.evaluate.evaluate) on a run: the current code, and with
--before REV the evaluate module of git revision REV too, interleaved (before, after, after,
before, ...) so that both see the same load on a shared machine. Prints every timing, each
median, and the median of the per-pair ratios.

The LM loads once and is passed in, so each timing is the evaluation itself (text, SAE, the
per-layer splices; with --replace the multi-layer replacement, current code only).

    .venv/bin/python bench/eval_time.py RUN --tokens 512 --batch-size 2 --repeats 3 \\
        --before 596217f^
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, tmp: Path):
    """mlsae/evaluate.py as of git revision `rev`, imported as a separate module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mlsae/evaluate.py"],
                         check=True, capture_output=True, text=True).stdout
    path = tmp / "evaluate_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mlsae_evaluate_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", help="git revision of the code to compare with")
    p.add_argument("--replace", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import mlsae.evaluate as now
    from mlsae.options import TextOptions
    from mlsae.runs import load_run_lm, load_sae

    opts = TextOptions(tokens=args.tokens, batch_size=args.batch_size, device="cpu")
    lm = load_run_lm(load_sae(args.run), opts)
    with tempfile.TemporaryDirectory() as tmp:
        # cache=False: a repeat must not reuse the ablation sums of the one before
        after = dict({"replace": args.replace} if args.replace else {}, cache=False)
        variants = {"after": (now, after)}
        if args.before:
            variants["before"] = (module_at(args.before, Path(tmp)), {})
        times: dict[str, list[float]] = {k: [] for k in variants}
        results = {}
        for r in range(args.repeats):
            order = sorted(variants, reverse=r % 2 == 0)
            for name in order:
                mod, kw = variants[name]
                t0 = time.perf_counter()
                results[name] = mod.evaluate(args.run, opts, out=Path(tmp) / f"{name}.json",
                                             lm=lm, progress=False, **kw)
                times[name].append(time.perf_counter() - t0)
                print(f"repeat {r} {name}: {times[name][-1]:.1f} s", flush=True)
    res = results["after"]
    out = {"tokens": res["tokens"], "ce_positions": res["ce_positions"],
           "layers": len(res["layers"]), "threads": torch.get_num_threads(),
           "replace": args.replace,
           "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
           "median_s": {k: round(statistics.median(v), 2) for k, v in times.items()}}
    if "before" in times:
        out["median_ratio_before_over_after"] = round(statistics.median(
            b / a for b, a in zip(times["before"], times["after"])), 3)
        out["max_abs_diff"] = {key: max(abs(x - y) for x, y in zip(
            res["per_layer"][key], results["before"]["per_layer"][key]))
            for key in ("ce_clean", "ce_recon", "ce_zero", "kl", "fvu")}
    if "replacement" in res:
        out["replacement_dce"] = res["replacement"]["dce"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
