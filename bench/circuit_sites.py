"""How many latent nodes does a faithful circuit need at each (layer, position) site
(issue 22's goal: <= 200 nodes at faithfulness >= 0.8)? A site is one spliced layer at one
token position: the k latents active there.

For each prompt and site, the site's latents are ranked by |effect| (`mlsae.circuits.effects`)
and the site alone is ablated down to its top j (the rest of the site mean-ablated, every
other site clean, `mlsae.circuits.causal`'s mean ablation on the real model). The site's
need j* is the smallest j in NEEDS whose faithfulness is within [1 - TOL, 1 + TOL] (k: no
proper subset is); TOL is a share of m(M) - m(empty), so a prompt with a small gap is held
to a tighter metric tolerance. The sum of j* over the sites is what the circuit costs if
each site must be kept as well as it must be alone; the script then keeps exactly those
per-site sets everywhere at once ("joint"), compares with the same number of latents by
|effect|, and ablates only the sites that need nothing (all others whole: do the small
shifts those sites were allowed add up?).

Prints per prompt: the sites that need any latent, their needs by layer, the sum and the
three faithfulness figures; the last spliced layer's last-position site alone, F by how many
of its latents are kept; and, when that layer is the model's last block, its readout: each
active latent mean-ablated alone (everything else clean) with the final RMSNorm live and with
its scale frozen at the clean value (then a drop is exactly the latent's direct logit
contribution), as sums of |drop| and signed sums, and the whole site ablated at once, live
and frozen.

    OMP_NUM_THREADS=2 .venv/bin/python bench/circuit_sites.py runs/default-150k \\
        --prompts bench/circuit_prompts.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from graph_selection import prepare  # this folder's: one prompt's graph and effects

from mlsae.circuits.causal import _ablate_masks, ablated_metrics
from mlsae.circuits.command import GraphConfig, GraphSession, read_prompts
from mlsae.circuits.linear import _inv_rms
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
def readout(sae, lm, cap, means, direction) -> dict | None:
    """The last block's site at the last position (the residual the unembedding reads):
    each active latent mean-ablated alone, the metric's drop with the final RMSNorm
    (weight * r / rms(r)) live and with its rms frozen at the clean value (then the drop is
    exactly the latent's direct contribution: the metric is linear in r), their sums of
    |.| and signed sums; and the whole site ablated at once, live and frozen. None if the
    last position is excluded from the code."""
    v = len(lm.blocks) - 1
    lc = cap.codes[v]
    if not bool(lc.inc[-1]):
        return None
    acts, idx = lc.code.acts[-1:], lc.code.idx[-1:]
    mu, std = lc.code.mu[-1:], lc.code.std[-1:]
    mean = torch.where(acts > 0, means[cap.layers.index(v)][idx], acts)  # inactive: as is
    norm = lm.final_norm()
    head = lm.model.get_output_embeddings().weight.float().T @ direction.float()  # [d]
    w = norm.weight.float()
    r0 = lc.x[-1:].float()

    def rms(r):  # as the final norm computes it
        return 1.0 / _inv_rms(norm, r)

    def drops(a):  # (live, frozen) drop of the metric when the code's acts become `a`
        r = r0 + sae.decode(SparseCode(a, idx, mu, std)) - base
        m_live, m_frozen = (float((w * r / z) @ head) for z in (rms(r), rms(r0)))
        return m0 - m_live, m0 - m_frozen

    base = sae.decode(SparseCode(acts, idx, mu, std))
    m0 = float((w * r0 / rms(r0)) @ head)
    live, fixed = [], []
    for slot in (acts[0] > 0).nonzero()[:, 0].tolist():
        a = acts.clone()
        a[0, slot] = mean[0, slot]
        d_live, d_fixed = drops(a)
        live.append(d_live)
        fixed.append(d_fixed)
    live, fixed = torch.tensor(live), torch.tensor(fixed)
    site_live, site_fixed = drops(mean)
    return {"latents": len(live), "alone_sum_abs": float(live.abs().sum()),
            "alone_net": float(live.sum()), "direct_sum_abs": float(fixed.abs().sum()),
            "direct_net": float(fixed.sum()), "site_drop": site_live,
            "site_drop_norm_frozen": site_fixed}


def site_needs(sae, lm, cap, g, means, direction, m_full, lat, eff) -> dict:
    """Each site's need j* (module docstring); F of the union of the needs kept together
    ("joint"), of the same number of latents by |effect|, and with only the sites that need
    nothing ablated (every other site kept whole); m(empty); and {j: F} of the last spliced
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
                need[k] = min(j, len(sites[k]))
        todo = [k for k in todo if need[k] is None]
    for k in todo:
        need[k] = len(sites[k])
    keep = torch.zeros(g.n_nodes, dtype=torch.bool)
    for k, j in need.items():
        at = sites[k]
        keep[at[rank[at] < j]] = True
    top = torch.zeros(g.n_nodes, dtype=torch.bool)
    top[lat[torch.argsort(eff[lat].abs(), descending=True)][:int(keep.sum())]] = True
    idle = torch.cat([sites[k] for k, j in need.items() if j == 0] or [lat[:0]])
    last = (max(cap.layers), cap.n_pos - 1)
    m_empty, fs = faith([_ablate_masks(g, cap, lat[~keep[lat]], sae.n_latents),
                         _ablate_masks(g, cap, lat[~top[lat]], sae.n_latents),
                         _ablate_masks(g, cap, idle, sae.n_latents)]
                        + [keep_top(last, j) for j in NEEDS])  # the readout site alone
    return {"need": need, "sites": sites, "last": last, "m_empty": m_empty,
            "f_joint": fs[0], "f_same_n": fs[1], "f_idle_ablated": fs[2],
            "curve": dict(zip(NEEDS, fs[3:]))}


def measure(session: GraphSession, means, text: str, tgt: str | None, con: str | None,
            steps: int) -> dict:
    sae, lm = session.sae, session.lm
    t0 = time.perf_counter()
    cap, g, direction, m_full, lat, eff = prepare(session, means, text, tgt, con, steps)
    sn = site_needs(sae, lm, cap, g, means, direction, m_full, lat, eff)
    need, (last_v, last_p) = sn["need"], sn["last"]
    at_readout = sn["sites"][sn["last"]]
    per_layer = {}
    for (v, _), j in need.items():
        per_layer[v] = per_layer.get(v, 0) + j
    return {"prompt": text, "m_full": m_full, "m_empty": sn["m_empty"],
            "sites": len(need), "sites_needing_latents": sum(j > 0 for j in need.values()),
            "nodes_needed": sum(need.values()), "need_by_layer": per_layer,
            "need_last_position": sum(j for (_, q), j in need.items() if q == last_p),
            "need_readout_site": need[sn["last"]],
            "faithfulness_joint": sn["f_joint"], "faithfulness_same_n_by_effect":
            sn["f_same_n"], "faithfulness_only_idle_sites_ablated": sn["f_idle_ablated"],
            "readout_sum_abs_effect": float(eff[at_readout].abs().sum()),
            "readout_net_effect": float(eff[at_readout].sum()),
            "readout_alone_curve": sn["curve"],
            "readout": readout(sae, lm, cap, means, direction)
            if last_v == len(lm.blocks) - 1 else None,
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
    for text, tgt, con in read_prompts(args.prompts):
        row = measure(session, means, text, tgt, con, args.effect_steps)
        rows.append(row)
        ro = row["readout"]
        alone = ("" if ro is None else
                 f"; one at a time: sum|drop| {ro['alone_sum_abs']:.2f} (net "
                 f"{ro['alone_net']:+.2f}), direct (norm frozen) sum|.| "
                 f"{ro['direct_sum_abs']:.2f} (net {ro['direct_net']:+.2f}); whole site "
                 f"ablated: drop {ro['site_drop']:+.2f}, norm frozen "
                 f"{ro['site_drop_norm_frozen']:+.2f}")
        print(f"{text[-24:]!r}: m_full {row['m_full']:.2f} m_empty {row['m_empty']:.2f}; "
              f"{row['sites_needing_latents']}/{row['sites']} sites need latents, "
              f"{row['nodes_needed']} nodes ({row['need_last_position']} at the last "
              f"position); F joint {row['faithfulness_joint']:.2f}, F same n by effect "
              f"{row['faithfulness_same_n_by_effect']:.2f}, F only idle sites ablated "
              f"{row['faithfulness_only_idle_sites_ablated']:.2f}; final-layer readout "
              f"(needs {row['need_readout_site']}) sum|effect| "
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
