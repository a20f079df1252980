"""Across prompts: how often an edge joins a latent to ITSELF at the next spliced layer (the
cross-layer identity only an MLSAE has) against edges between different latents, and how much
of the target's attribution flows through such self-edges. Uses mlsae.circuits.attribution
and .influence.

Per graph, over the latent -> latent edges (between adjacent spliced layers; the edge blocks
are dense, so every (source, target) pair at adjacent layers is an edge):
  pair_share     share of pairs whose latent ids are equal: the chance level
  weight_share   share of sum |weight| on self pairs
  flow_share     share of the edge influence (|normalised weight| x the target's influence
                 reaching the edge's target, circuit-tracer's edge score) on self pairs
  same_pos_flow  the part of flow_share whose two ends are at the same position
  pruned_share   share of self pairs among the latent -> latent links kept by pruning
"""

from __future__ import annotations

import torch

from mlsae.circuits.attribution import LATENT, Graph
from mlsae.circuits.influence import Pruned, _normalise, node_influence


def self_edges(graph: Graph, pruned: Pruned | None = None) -> dict:
    infl = node_influence(graph) if pruned is None else pruned.influence
    weight = torch.zeros(graph.n_nodes, dtype=torch.float64)
    weight[graph.target_node] = 1.0
    tot = {"pairs": 0, "self_pairs": 0, "weight": 0.0, "self_weight": 0.0, "flow": 0.0,
           "self_flow": 0.0, "same_pos_flow": 0.0}
    for blk in graph.blocks:
        t_lat = graph.kind[blk.tgt] == LATENT
        s_lat = graph.kind[blk.src] == LATENT
        if not bool(t_lat.any()) or not bool(s_lat.any()):
            continue
        A = _normalise(blk.W)[t_lat][:, s_lat]
        W = blk.W[t_lat][:, s_lat].abs().double()
        flow = A * (weight[blk.tgt][t_lat] + infl[blk.tgt][t_lat])[:, None]
        tgt, src = blk.tgt[t_lat], blk.src[s_lat]
        same = graph.latent[tgt][:, None] == graph.latent[src][None, :]
        same_pos = same & (graph.pos[tgt][:, None] == graph.pos[src][None, :])
        tot["pairs"] += same.numel()
        tot["self_pairs"] += int(same.sum())
        tot["weight"] += float(W.sum())
        tot["self_weight"] += float(W[same].sum())
        tot["flow"] += float(flow.sum())
        tot["self_flow"] += float(flow[same].sum())
        tot["same_pos_flow"] += float(flow[same_pos].sum())
    out = {"latent_pairs": tot["pairs"], "self_pairs": tot["self_pairs"],
           "pair_share": tot["self_pairs"] / max(tot["pairs"], 1),
           "weight_share": tot["self_weight"] / max(tot["weight"], 1e-30),
           "flow_share": tot["self_flow"] / max(tot["flow"], 1e-30),
           "same_pos_flow_share": tot["same_pos_flow"] / max(tot["flow"], 1e-30)}
    if pruned is not None:
        kinds, lat = graph.kind, graph.latent
        links = [(s, t) for s, t, _ in pruned.edges
                 if int(kinds[s]) == LATENT and int(kinds[t]) == LATENT]
        n_self = sum(int(lat[s]) == int(lat[t]) for s, t in links)
        out.update(pruned_latent_links=len(links), pruned_self_links=n_self,
                   pruned_share=n_self / max(len(links), 1))
    return out


def summarise(rows: list[dict]) -> dict:
    """Pooled self-edge figures over prompts (each row a `self_edges` result): means of the
    per-prompt shares and the pooled pruned-link share."""
    if not rows:
        return {}
    keys = ("pair_share", "weight_share", "flow_share", "same_pos_flow_share")
    out = {f"mean_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
    links = sum(r.get("pruned_latent_links", 0) for r in rows)
    out["pruned_share_pooled"] = sum(r.get("pruned_self_links", 0) for r in rows) / max(links, 1)
    out["prompts"] = len(rows)
    return out
