"""The paper's statistics measured with each architecture (issue 20 item 4).

    # synthetic truth: cache + one run per architecture (from one cache pass), scored
    python bench/arch_science.py synth --out /tmp/arch-synth [--k 8]
    # or score runs that exist already: NAME=RUN ...
    python bench/arch_science.py synth --out /tmp/arch-synth --runs topk=R1 jumprelu=R2
    # a language model: the same statistics of trained runs on their held-out text
    python bench/arch_science.py lm --runs topk=runs/p/topk-k32 batchtopk=... [--tokens 4096]

Synthetic: `mlsae synth` defaults (d 128, 8 layers, 1,024 true directions, ~7 active per
vector), the default trainer with --k K for every architecture, `mlsae synth-score` on 16,384
fresh tokens: recovery (best decoder cosine > 0.9), the layer statistics of the SAE's codes
next to the truth's, weak firings (active activations below 1% / 5% of the latent's mean),
and the firing agreement of each recovered latent with its feature (spurious / missed).
LM: the same statistics from the codes of each run on its held-out split (each run's own
active rule: token-topk encodes a token's layers together), with L0 so that rows can be
compared at matched L0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

STATS = ("l0", "aggregated_over_per_token_ratio", "frac_latents_multi_layer", "persistence",
         "frac_pairs_contiguous", "mean_lifespan", "frac_weak_1pct", "frac_weak_5pct")
ARCHS = ("topk", "batchtopk", "token-topk", "jumprelu", "matryoshka")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(columns: dict[str, dict], keys) -> str:
    names = list(columns)
    lines = ["| statistic | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(columns[n].get(k)) for n in names) + " |")
    return "\n".join(lines)


def synth(args) -> None:
    from mlsae.synth import SynthSpec, synth_score, write_synth

    out = Path(args.out)
    cache = out / "cache"
    if not (cache / "manifest.json").exists():
        write_synth(cache, SynthSpec())
    runs = dict(r.split("=", 1) for r in args.runs) if args.runs else {}
    if not runs:
        sweep = out / "sweep"
        if not (sweep / "sweep.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mlsae", "train", "--activations",
                            str(cache), "--eval-tokens", "0", "--out", str(sweep), "--sweep",
                            f"arch={','.join(ARCHS)} k={args.k}"], check=True)
            print(f"trained {len(ARCHS)} runs from one cache pass in "
                  f"{time.perf_counter() - t0:.0f} s")
        runs = {a: str(sweep / f"{a}-k{args.k}") for a in ARCHS}
    cols: dict[str, dict] = {}
    agree: dict[str, dict] = {}
    for name, run in runs.items():
        res = synth_score(run, cache, tokens=args.tokens)
        if not cols:
            cols["truth"] = dict(res["true"], frac_recovered=None, fvu=None)
        cols[name] = dict(res["sae"], frac_recovered=res["frac_recovered"], fvu=res["fvu"])
        agree[name] = res["firing_agreement"]
    print(markdown(cols, ("frac_recovered", "fvu") + STATS))
    print()
    print(markdown(agree, ("spurious_share", "spurious_rel_median", "spurious_rel_p90",
                           "missed_share")))
    (out / "arch_science_synth.json").write_text(json.dumps(
        {"columns": cols, "agreement": agree}, indent=2) + "\n")


@torch.no_grad()
def lm(args) -> None:
    from mlsae.analysis.codes import open_run
    from mlsae.options import TextOptions
    from mlsae.synth import Stats

    cols = {}
    loaded = None
    for item in args.runs:
        name, run = item.split("=", 1)
        codes = open_run(run, TextOptions(tokens=args.tokens, batch_size=8), lm=loaded)
        loaded = codes.lm
        st = Stats(codes.n_layers, codes.sae.n_latents)
        batch_list, _ = codes.text()
        for _, _, acts, idx, mask in codes.stream(batch_list, name, progress=False):
            st.update(idx[:, mask], acts[:, mask])  # included tokens only: [L, n, width]
        cols[name] = st.compute()
        cols[name]["active_rule"] = codes.sae.arch.active_rule(codes.sae, per_token=True)
    print(markdown(cols, STATS))
    if args.json:
        Path(args.json).write_text(json.dumps(cols, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("synth")
    s.add_argument("--out", required=True)
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--tokens", type=int, default=16_384)
    s.add_argument("--runs", nargs="*", help="NAME=RUN pairs to score instead of training")
    s.set_defaults(func=synth)
    m = sub.add_parser("lm")
    m.add_argument("--runs", nargs="+", required=True, help="NAME=RUN pairs")
    m.add_argument("--tokens", type=int, default=4096)
    m.add_argument("--json", help="also write the table as JSON here")
    m.set_defaults(func=lm)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
