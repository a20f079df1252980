"""How many latent nodes does a faithful circuit need at each (layer, position) site
(issue 22's goal: <= 200 nodes at faithfulness >= 0.8)? A site is one spliced layer at one
token position: the k latents active there.

For each prompt and site, the site's latents are ranked by |effect| (`mlsae.circuits.effects`)
and the site alone is ablated down to its top j (the rest of the site mean-ablated, every
other site clean, `mlsae.circuits.causal`'s mean ablation on the real model). The site's
need j* is the smallest j in NEEDS whose faithfulness is within [1 - TOL, 1 + TOL] (k: no
proper subset is). The sum of j* over the sites is what the circuit costs if each site must
be kept as well as it must be alone; the script then keeps exactly those per-site sets
everywhere at once ("joint") and compares with the same number of latents by |effect|.

Prints per prompt: the last spliced layer's last-position site alone, F by how many of its
latents are kept; the sites that need any latent, their needs by layer, the sum, and the
two faithfulness figures; and the final layer's readout at the last position: sum |effect|
of its latents against their net effect, and each latent mean-ablated alone (everything
else clean) with the final RMSNorm's scale live and frozen at its clean value, which tells
whether the latents' effects cancel through the norm or in their direct logit contributions.

    OMP_NUM_THREADS=2 .venv/bin/python bench/circuit_sites.py runs/default-150k \\
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
from mlsae.circuits.effects import integrated_effects
from mlsae.circuits.linear import capture
from mlsae.sae import SparseCode

NEEDS = (0, 1, 2, 4, 8, 16, 24, 28, 31)
TOL = 0.1


def site_ranks(g, lat, eff):
    """Per latent node: its rank by |effect| within its site; and the sites' node lists."""
    rank = torch.zeros(g.n_nodes, dtype=torch.long)
    sites = {}
    for n in lat.tolist():
        sites.setdefault((int(g.layer[n]), int(g.pos[n])), []).append(n)
    for nodes in sites.values():
        at = torch.tensor(nodes)
        rank[at[torch.argsort(eff[at].abs(), descending=True)]] = torch.arange(len(at))
    return rank, {k: torch.tensor(v) for k, v in sites.items()}


@torch.no_grad()
def readout_ablations(sae, lm, cap, means, direction) -> tuple[torch.Tensor, torch.Tensor]:
    """`[k]` each: the metric's drop when one latent of the last block's code at the last
    position is mean-ablated alone, with the final RMSNorm (weight * r / rms(r)) live and
    with its rms frozen at the clean value."""
    v = len(lm.blocks) - 1
    lc = cap.codes[v]
    acts, idx = lc.code.acts[-1:], lc.code.idx[-1:]
    mu, std = lc.code.mu[-1:], lc.code.std[-1:]
    norm = lm.final_norm()
    head = lm.model.get_output_embeddings().weight.float().T @ direction.float()  # [d]
    w = norm.weight.float()

    def rms(r):
        return (r.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()

    r0 = lc.x[-1:].float()
    base = sae.decode(SparseCode(acts, idx, mu, std))
    m0 = float((w * r0 / rms(r0)) @ head)
    live, fixed = [], []
    for s in range(acts.shape[1]):
        a = acts.clone()
        a[0, s] = means[cap.layers.index(v)][idx[0, s]]
        r = r0 + sae.decode(SparseCode(a, idx, mu, std)) - base
        live.append(m0 - float((w * r / rms(r)) @ head))
        fixed.append(m0 - float((w * r / rms(r0)) @ head))
    return torch.tensor(live), torch.tensor(fixed)


def site_needs(sae, lm, cap, g, means, direction, m_full, lat, eff):
    """Each site's need j* (module docstring), F of the union of the needs kept together,
    F of the same number of latents by |effect|, m(empty), and {j: F} of the last spliced
    layer's last-position site alone kept to its top j."""
    rank, sites = site_ranks(g, lat, eff)

    def faith(ablations):
        ms = ablated_metrics(sae, lm, cap, means,
                             [_ablate_masks(g, cap, lat, sae.n_latents)] + ablations, direction)
        return ms[0], [(m - ms[0]) / (m_full - ms[0]) for m in ms[1:]]

    def keep_top(key, j):  # the site ablated down to its top j, all else clean
        at = sites[key]
        return _ablate_masks(g, cap, at[rank[at] >= j], sae.n_latents)

    need = dict.fromkeys(sites)
    todo = list(sites)
    for j in NEEDS:  # only the sites still short are tried with more latents
        if not todo:
            break
        _, fs = faith([keep_top(k, j) for k in todo])
        for k, f in zip(todo, fs):
            if abs(f - 1.0) <= TOL:
                need[k] = j
        todo = [k for k in todo if need[k] is None]
    for k in todo:
        need[k] = len(sites[k])
    keep = torch.zeros(g.n_nodes, dtype=torch.bool)
    for k, j in need.items():
        at = sites[k]
        keep[at[rank[at] < j]] = True
    top = torch.zeros(g.n_nodes, dtype=torch.bool)
    top[lat[torch.argsort(eff[lat].abs(), descending=True)][:int(keep.sum())]] = True
    m_empty, (f_joint, f_eff) = faith([_ablate_masks(g, cap, lat[~keep[lat]], sae.n_latents),
                                       _ablate_masks(g, cap, lat[~top[lat]], sae.n_latents)])
    last = (max(cap.layers), cap.n_pos - 1)
    _, curve = faith([keep_top(last, j) for j in NEEDS])  # the readout site alone
    return need, sites, f_joint, f_eff, m_empty, dict(zip(NEEDS, curve))


def measure(session, means, text: str, tgt: str, con: str, steps: int) -> dict:
    sae, lm = session.sae, session.lm
    t0 = time.perf_counter()
    cap = capture(sae, lm, tokenize(lm, text, session.limit), session.layers, session.data_cfg)
    target = make_target(lm, cap.logits[-1], session.cfg, tgt, con)
    g = attribute(sae, lm, cap, target, "jacobian", text)
    direction = target.direction(cap.logits.shape[-1])
    m_full = float(cap.logits[-1] @ direction)
    lat = (g.kind == LATENT).nonzero()[:, 0]
    eff, _ = integrated_effects(sae, lm, cap, g, means, steps)
    need, sites, f_joint, f_eff, m_empty, curve = site_needs(sae, lm, cap, g, means, direction,
                                                      m_full, lat, eff)
    last_v, last_p = max(session.layers), cap.n_pos - 1
    readout = sites[(last_v, last_p)]
    live = fixed = None
    if last_v == len(lm.blocks) - 1:
        live, fixed = readout_ablations(sae, lm, cap, means, direction)
    per_layer = {}
    for (v, _), j in need.items():
        per_layer[v] = per_layer.get(v, 0) + j
    return {"prompt": text, "m_full": m_full, "m_empty": m_empty, "sites": len(sites),
            "sites_needing_latents": sum(j > 0 for j in need.values()),
            "nodes_needed": sum(need.values()), "need_by_layer": per_layer,
            "need_last_position": sum(j for (_, q), j in need.items() if q == last_p),
            "faithfulness_joint": f_joint, "faithfulness_same_n_by_effect": f_eff,
            "readout_sum_abs_effect": float(eff[readout].abs().sum()),
            "readout_net_effect": float(eff[readout].sum()),
            "readout_alone_curve": curve,
            "readout_alone_sum_abs": None if live is None else float(live.abs().sum()),
            "readout_alone_sum_abs_norm_frozen": None if fixed is None
            else float(fixed.abs().sum()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--prompts", default="bench/circuit_prompts.txt")
    p.add_argument("--effect-steps", type=int, default=8)
    p.add_argument("--out", default="/tmp/circuit_sites.json")
    args = p.parse_args()
    session = GraphSession(args.run, GraphConfig(metric="logit-diff"))
    means, _ = session.means()
    rows = []
    for line in open(args.prompts).read().splitlines():
        if not line.strip():
            continue
        text, tgt, con = [x.replace("\\n", "\n") for x in line.split("\t")]
        row = measure(session, means, text, tgt, con, args.effect_steps)
        rows.append(row)
        alone = ("" if row["readout_alone_sum_abs"] is None else
                 f" (one at a time: sum|drop| {row['readout_alone_sum_abs']:.2f}, norm frozen "
                 f"{row['readout_alone_sum_abs_norm_frozen']:.2f})")
        print(f"{text[-24:]!r}: m_full {row['m_full']:.2f} m_empty {row['m_empty']:.2f}; "
              f"{row['sites_needing_latents']}/{row['sites']} sites need latents, "
              f"{row['nodes_needed']} nodes ({row['need_last_position']} at the last "
              f"position); F joint {row['faithfulness_joint']:.2f}, F same n by effect "
              f"{row['faithfulness_same_n_by_effect']:.2f}; final-layer readout sum|effect| "
              f"{row['readout_sum_abs_effect']:.2f} net {row['readout_net_effect']:+.2f}"
              f"{alone}; {row['seconds']:.0f} s", flush=True)
        print("   last layer, last position alone, F by latents kept: " + " ".join(
            f"{j}:{f:.2f}" for j, f in row["readout_alone_curve"].items()), flush=True)
        print("   need by layer: " + " ".join(
            f"{v}:{j}" for v, j in sorted(row["need_by_layer"].items()) if j), flush=True)
    ns = [r["nodes_needed"] for r in rows]
    fj = [r["faithfulness_joint"] for r in rows]
    print(f"\nnodes needed: median {statistics.median(ns):.0f}, min {min(ns)}, max {max(ns)}; "
          f"<= 200 on {sum(n <= 200 for n in ns)}/{len(ns)} prompts; F joint median "
          f"{statistics.median(fj):.2f}, within [0.8, 1.25] on "
          f"{sum(0.8 <= f <= 1.25 for f in fj)}/{len(fj)}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
