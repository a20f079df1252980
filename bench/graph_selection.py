"""Which latents make a faithful circuit (issue 22)? Faithfulness of the top-n latents of each
prompt under several rankings (below), all measured the same way (the real model, the
latents outside the set mean-ablated, `mlsae.circuits.causal`):

- influence: circuit-tracer's, gradient x activation through the linearised graph (the
  default pruning of `mlsae graph`);
- effect: integrated gradients on the real model along the ablation path
  (`mlsae.circuits.effects`, `mlsae graph --select effect`);
- greedy: ten latents at a time, those whose first-order gain (`effects.path_point` at the
  current set) moves the metric furthest from m(empty) towards and past m(clean). It
  optimises the number that faithfulness measures, so it shows how far a selection rule can
  push F without reproducing the model: a diagnostic, not a pruning rule;
- positive: the n latents of largest signed effect towards m(clean) (no cancelling ones);
- position: the budget split over token positions in proportion to their summed |effect|,
  each position's share by |effect| (so an earlier position's diffuse evidence gets its
  share);
- chain: whole (latent, position) pairs, every layer where the pair is a node, by their
  summed |effect| (an MLSAE latent persists across layers: keep it along its path);
- conditional: a quarter of the budget by |effect|, then effects recomputed along the path
  where the chosen latents stay clean and only the rest move (`path_point` with a per-node
  alpha), the next quarter by those, and so on (interactions re-read after each quarter).

`--rankings` picks which (default influence, effect, greedy), `--sizes` the budgets.

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

from mlsae.circuits.attribution import LATENT
from mlsae.circuits.causal import _ablate_masks, ablated_metrics
from mlsae.circuits.command import GraphConfig, GraphSession, read_prompts
from mlsae.circuits.effects import integrated_effects, latent_slots, path_point
from mlsae.circuits.influence import node_influence

SIZES = (20, 50, 100, 200)
RANKINGS = ("influence", "effect", "greedy", "positive", "position", "chain", "conditional")


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


def by_position(g, lat, eff, n: int):
    """Latent node ids: n split over positions by summed |effect| (largest remainders),
    each position's share by |effect| (fewer than n if a position holds fewer latents than
    its share; the JSON's `chosen` records it)."""
    a = eff.abs()
    pos = g.pos[lat]
    tot = torch.zeros(int(pos.max()) + 1, dtype=torch.float64).index_add_(0, pos, a[lat])
    raw = n * tot / tot.sum()
    quota = raw.floor().long()
    extra = n - int(quota.sum())
    quota[torch.argsort(raw - quota, descending=True)[:extra]] += 1
    out = []
    for q in range(len(tot)):
        at = lat[pos == q]
        out.append(at[torch.argsort(a[at], descending=True)][:int(quota[q])])
    return torch.cat(out)


def by_chain(g, lat, eff, n: int):
    """Latent node ids: whole (latent, position) pairs in order of summed |effect|, a pair
    that would overrun n skipped for the next that fits, until n are chosen (or none
    fits: then fewer, which the JSON's `chosen` records)."""
    key = g.latent[lat] * (int(g.pos.max()) + 1) + g.pos[lat]
    uniq, inv = torch.unique(key, return_inverse=True)
    score = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, eff[lat].abs())
    members = [[] for _ in range(len(uniq))]
    for node, u in zip(lat.tolist(), inv.tolist()):
        members[u].append(node)
    out: list[int] = []
    for u in torch.argsort(score, descending=True).tolist():
        if len(out) + len(members[u]) <= n:
            out += members[u]
        if len(out) == n:
            break
    return torch.tensor(out, dtype=torch.long)


def conditional(session, cap, g, means, direction, eff, n: int, rounds: int = 4,
                steps: int = 8):
    """Latent node ids: `rounds` shares of n, each by |effect| recomputed with the nodes
    chosen so far held at their clean values (alpha 1) while the rest move from their
    means."""
    lat = (g.kind == LATENT).nonzero()[:, 0]
    parts = [(v, at, *latent_slots(g, cap, at)) for v in cap.layers
             for at in [lat[g.layer[lat] == v]] if len(at)]
    keep = torch.zeros(g.n_nodes, dtype=torch.bool)
    e = eff.clone()
    for r in range(rounds):
        cand = lat[~keep[lat]]
        share = n // rounds if r < rounds - 1 else n - int(keep.sum())
        keep[cand[torch.argsort(e[cand].abs(), descending=True)][:share]] = True
        if r == rounds - 1:
            break
        e = torch.zeros(g.n_nodes, dtype=torch.float64)
        for j in range(steps):
            t = (j + 0.5) / steps
            alpha = {v: torch.full(cap.codes[v].code.idx.shape, t) for v in cap.layers}
            for v, at, rows, slots in parts:
                alpha[v][rows, slots] = torch.where(keep[at], 1.0, t)
            _, part = path_point(session.sae, session.lm, cap, means, direction, alpha)
            for v, at, rows, slots in parts:
                e[at] += part[v].cpu()[rows, slots].double() / steps
    return keep.nonzero()[:, 0]


def selections(session, means, cap, g, direction, m_full: float, m_empty: float, eff, infl,
               names: list[str], sizes: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    """{(ranking, n): latent node ids} for each asked ranking and budget."""
    lat = (g.kind == LATENT).nonzero()[:, 0]
    sign = 1.0 if m_full >= m_empty else -1.0  # effects towards m(clean) from m(empty)
    orders = {}
    if "influence" in names:
        orders["influence"] = lat[torch.argsort(infl[lat], descending=True)]
    if "effect" in names:
        orders["effect"] = lat[torch.argsort(eff[lat].abs(), descending=True)]
    if "positive" in names:
        orders["positive"] = lat[torch.argsort(eff[lat] * sign, descending=True)]
    if "greedy" in names:
        orders["greedy"] = greedy(session, cap, g, means, direction, m_full, max(sizes))
    sets = {}
    for name in names:
        for n in sizes:
            if name in orders:
                sets[name, n] = orders[name][:n]
            elif name == "position":
                sets[name, n] = by_position(g, lat, eff, n)
            elif name == "chain":
                sets[name, n] = by_chain(g, lat, eff, n)
            else:
                sets[name, n] = conditional(session, cap, g, means, direction, eff, n)
    return sets


def prepare(session: GraphSession, means, text: str, tgt: str | None, con: str | None,
            steps: int):
    """One prompt's capture, jacobian graph, metric direction, m(M), latent node ids and
    their integrated-gradient effects (`steps` points)."""
    cap, g = session.trace(text, tgt, con)
    direction = g.target.direction(cap.logits.shape[-1])
    lat = (g.kind == LATENT).nonzero()[:, 0]
    eff, _ = integrated_effects(session.sae, session.lm, cap, g, means, steps)
    return cap, g, direction, float(cap.logits[-1] @ direction), lat, eff


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--prompts", default="bench/circuit_prompts.txt")
    p.add_argument("--effect-steps", type=int, default=8)
    p.add_argument("--out", default="/tmp/graph_selection.json")
    p.add_argument("--rankings", default="influence,effect,greedy",
                   help=f"comma-separated, of {', '.join(RANKINGS)}")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="comma-separated latent budgets")
    args = p.parse_args()
    names = args.rankings.split(",")
    bad = [r for r in names if r not in RANKINGS]
    if bad:
        p.error(f"--rankings: unknown {bad[0]!r} (choose from {', '.join(RANKINGS)})")
    sizes = [int(x) for x in args.sizes.split(",")]
    session = GraphSession(args.run, GraphConfig(metric="logit-diff"))
    means, _ = session.means()
    rows = []
    for text, tgt, con in read_prompts(args.prompts):
        t0 = time.perf_counter()
        cap, g, direction, m_full, lat, eff = prepare(session, means, text, tgt, con,
                                                      args.effect_steps)
        infl = node_influence(g)
        m_empty = ablated_metrics(session.sae, session.lm, cap, means,
                                  [_ablate_masks(g, cap, lat, session.sae.n_latents)],
                                  direction)[0]
        sets = selections(session, means, cap, g, direction, m_full, m_empty, eff, infl,
                          names, sizes)
        runs = []
        keys = list(sets)
        for chosen in sets.values():
            keep = torch.zeros(g.n_nodes, dtype=torch.bool)
            keep[chosen] = True
            runs.append(_ablate_masks(g, cap, lat[~keep[lat]], session.sae.n_latents))
        ms = ablated_metrics(session.sae, session.lm, cap, means, runs, direction)
        faith = {f"{k[0]}@{k[1]}": (m - m_empty) / (m_full - m_empty)
                 for k, m in zip(keys, ms)}
        rows.append({"prompt": text, "m_full": m_full, "m_empty": m_empty,
                     "latent_nodes": len(lat), "faithfulness": faith,
                     "chosen": {f"{k[0]}@{k[1]}": len(v) for k, v in sets.items()},
                     "seconds": time.perf_counter() - t0})
        print(f"{text[-20:]!r}: m_full {m_full:.2f}, m_empty {m_empty:.2f}, "
              + ", ".join(f"{k} {v:.2f}" for k, v in faith.items()), flush=True)
    print("\nranking@n: median F, prompts with F >= 0.8, prompts with 0.8 <= F <= 1.25")
    for name in names:
        for n in sizes:
            fs = [r["faithfulness"][f"{name}@{n}"] for r in rows]
            print(f"{name}@{n}: {statistics.median(fs):.2f}, {sum(f >= 0.8 for f in fs)}"
                  f"/{len(fs)}, {sum(0.8 <= f <= 1.25 for f in fs)}/{len(fs)}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
