"""Which latents make a faithful circuit (issue 22)? Faithfulness of the top-n latents of each
prompt under three rankings, all measured the same way (the real model, the latents outside
the set mean-ablated, `mlsae.circuits.causal`):

- influence: circuit-tracer's, gradient x activation through the linearised graph (the
  default pruning of `mlsae graph`);
- effect: integrated gradients on the real model along the ablation path
  (`mlsae.circuits.effects`, `mlsae graph --select effect`);
- greedy: ten latents at a time, those whose first-order gain (`effects.path_point` at the
  current set) moves the metric furthest from m(empty) towards and past m(clean). It
  optimises the number that faithfulness measures, so it shows how far a selection rule can
  push F without reproducing the model: a diagnostic, not a pruning rule.

Prints, per ranking and size, F per prompt, its median, how many prompts reach F >= 0.8
and how many land within [0.8, 1.25].

    OMP_NUM_THREADS=2 .venv/bin/python bench/graph_selection.py runs/default-150k \\
        --prompts bench/circuit_prompts.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlsae.circuits.attribution import LATENT, attribute
from mlsae.circuits.causal import _ablate_masks, ablated_metrics
from mlsae.circuits.command import GraphConfig, GraphSession, make_target, tokenize
from mlsae.circuits.effects import integrated_effects, latent_slots, path_point
from mlsae.circuits.influence import node_influence
from mlsae.circuits.linear import capture

SIZES = (20, 50, 100, 200)


def greedy(session, cap, g, means, direction, m_full: float, n: int, step: int = 10):
    """Latent node ids in the order greedy adds them (first `n`)."""
    lat = (g.kind == LATENT).nonzero()[:, 0]
    parts = []  # per layer: (layer, node ids, rows, slots) in the layer's code
    for v in cap.layers:
        at = lat[g.layer[lat] == v]
        if len(at):
            parts.append((v, at, *latent_slots(g, cap, at)))
    nodes = torch.cat([at for _, at, _, _ in parts])
    alpha = {v: torch.zeros(cap.codes[v].code.idx.shape) for v in cap.layers}
    m0, _ = path_point(session.sae, session.lm, cap, means, direction, alpha)
    sign = 1.0 if m_full >= m0 else -1.0
    taken = torch.zeros(len(nodes), dtype=torch.bool)
    chosen: list[int] = []
    while len(chosen) < min(n, len(nodes)):
        _, part = path_point(session.sae, session.lm, cap, means, direction, alpha)
        gain = sign * torch.cat([part[v].cpu()[rows, slots] for v, _, rows, slots in parts])
        gain[taken] = -float("inf")
        for t in torch.topk(gain, min(step, int((~taken).sum()))).indices.tolist():
            taken[t] = True
            chosen.append(int(nodes[t]))
        off = 0
        for v, at, rows, slots in parts:  # the chosen nodes are kept from now on
            alpha[v][rows, slots] = taken[off:off + len(at)].float()
            off += len(at)
    return torch.tensor(chosen)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--prompts", default="bench/circuit_prompts.txt")
    p.add_argument("--effect-steps", type=int, default=8)
    p.add_argument("--out", default="/tmp/graph_selection.json")
    args = p.parse_args()
    session = GraphSession(args.run, GraphConfig(metric="logit-diff"))
    means, _ = session.means()
    rows = []
    for line in open(args.prompts).read().splitlines():
        if not line.strip():
            continue
        text, tgt, con = [x.replace("\\n", "\n") for x in line.split("\t")]
        t0 = time.perf_counter()
        cap = capture(session.sae, session.lm, tokenize(session.lm, text, session.limit),
                      session.layers, session.data_cfg)
        target = make_target(session.lm, cap.logits[-1], session.cfg, tgt, con)
        g = attribute(session.sae, session.lm, cap, target, "jacobian", text)
        direction = target.direction(cap.logits.shape[-1])
        m_full = float(cap.logits[-1] @ direction)
        lat = (g.kind == LATENT).nonzero()[:, 0]
        infl = node_influence(g)
        eff, _ = integrated_effects(session.sae, session.lm, cap, g, means, args.effect_steps)
        orders = {"influence": lat[torch.argsort(infl[lat], descending=True)],
                  "effect": lat[torch.argsort(eff[lat].abs(), descending=True)],
                  "greedy": greedy(session, cap, g, means, direction, m_full, max(SIZES))}
        runs = [_ablate_masks(g, cap, lat, session.sae.n_latents)]
        keys = []
        for name, order in orders.items():
            for n in SIZES:
                keep = torch.zeros(g.n_nodes, dtype=torch.bool)
                keep[order[:n]] = True
                runs.append(_ablate_masks(g, cap, lat[~keep[lat]], session.sae.n_latents))
                keys.append((name, n))
        ms = ablated_metrics(session.sae, session.lm, cap, means, runs, direction)
        m_empty = ms[0]
        faith = {f"{k[0]}@{k[1]}": (m - m_empty) / (m_full - m_empty)
                 for k, m in zip(keys, ms[1:])}
        rows.append({"prompt": text, "m_full": m_full, "m_empty": m_empty,
                     "latent_nodes": len(lat), "faithfulness": faith,
                     "seconds": time.perf_counter() - t0})
        print(f"{text[-20:]!r}: m_full {m_full:.2f}, m_empty {m_empty:.2f}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in faith.items()), flush=True)
    print("\nranking@n: median F, prompts with F >= 0.8, prompts with 0.8 <= F <= 1.25")
    for name in ("influence", "effect", "greedy"):
        for n in SIZES:
            fs = [r["faithfulness"][f"{name}@{n}"] for r in rows]
            print(f"{name}@{n}: {statistics.median(fs):.2f}, {sum(f >= 0.8 for f in fs)}"
                  f"/{len(fs)}, {sum(0.8 <= f <= 1.25 for f in fs)}/{len(fs)}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
