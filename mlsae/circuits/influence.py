"""Node influence on the target and pruning by cumulative influence, as circuit-tracer does
it (`circuit_tracer.graph.prune_graph`, same defaults: 0.8 of node influence, 0.98 of edge
influence), on mlsae's layered graphs. Uses mlsae.circuits.attribution.

Influence is the Neumann series (I - A)^-1 - I of the row-normalised absolute adjacency A
(row = a node's incoming edges, normalised to sum 1), weighted by the target: the sum over
all paths into the target of the products of normalised edge weights. The graph is layered
(every edge goes one level up), so the series is exact after one top-down sweep over the
edge blocks, without forming the [nodes, nodes] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.circuits.attribution import EMBEDDING, LATENT, LOGIT, Graph


def _normalise(W: Tensor) -> Tensor:
    A = W.abs().double()
    return A / A.sum(1, keepdim=True).clamp_min(1e-10)


def node_influence(graph: Graph) -> Tensor:
    """`[n_nodes]`: each node's influence on the target (the target itself: 0)."""
    weight = torch.zeros(graph.n_nodes, dtype=torch.float64)
    weight[graph.target_node] = 1.0
    infl = torch.zeros(graph.n_nodes, dtype=torch.float64)
    for blk in sorted(graph.blocks, key=lambda b: -b.level):  # targets before their sources
        coef = weight[blk.tgt] + infl[blk.tgt]
        infl.index_add_(0, blk.src, coef @ _normalise(blk.W))
    return infl


def find_threshold(scores: Tensor, fraction: float) -> float:
    """The score above which the highest scores sum to `fraction` of the total
    (circuit-tracer's `find_threshold`)."""
    s = torch.sort(scores.flatten(), descending=True).values
    total = s.sum()
    if total <= 0:
        return float(s[0]) if len(s) else 0.0
    cum = torch.cumsum(s, 0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), len(s) - 1)
    return float(s[i])


@dataclass
class Pruned:
    """The kept part of a graph: `nodes` (node ids, ascending), `edges [n_kept_edges, 3]`
    (source id, target id, weight), each node's raw `influence` and circuit-tracer's
    cumulative score (the share of total influence of the nodes at least as influential,
    lower is more important) for every node."""

    nodes: Tensor
    edges: list[tuple[int, int, float]]
    influence: Tensor
    cumulative: Tensor
    node_threshold: float
    edge_threshold: float


def dense_adjacency(graph: Graph, keep: Tensor) -> Tensor:
    """`[n_keep, n_keep]` adjacency (rows targets) among the nodes `keep` (sorted ids)."""
    where = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    where[keep] = torch.arange(len(keep))
    M = torch.zeros(len(keep), len(keep), dtype=torch.float64)
    for blk in graph.blocks:
        ti, si = where[blk.tgt], where[blk.src]
        rt, rs = (ti >= 0).nonzero()[:, 0], (si >= 0).nonzero()[:, 0]
        if len(rt) and len(rs):
            M[ti[rt][:, None], si[rs][None, :]] = blk.W[rt][:, rs].double()
    return M


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          latents: Tensor | None = None) -> Pruned:
    """circuit-tracer's `prune_graph`: keep the nodes holding `node_threshold` of the total
    influence (embeddings and the target always), then the edges (among them) holding
    `edge_threshold` of the edge influence, then drop, repeatedly, latent/error/mlp nodes
    left without outgoing edges and latents left without incoming ones. `latents` (node
    ids): keep exactly these latent nodes instead of the influential ones (the threshold
    then picks only the other kinds)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    infl = node_influence(graph)
    node_mask = infl >= find_threshold(infl, node_threshold)
    if latents is not None:
        if not bool((graph.kind[latents] == LATENT).all()):
            raise ValueError("latents: every id must be a latent node")
        node_mask &= graph.kind != LATENT
        node_mask[latents] = True
    always = (graph.kind == EMBEDDING) | (graph.kind == LOGIT)
    node_mask |= always
    keep = node_mask.nonzero()[:, 0]
    M = dense_adjacency(graph, keep)
    weight = (graph.kind[keep] == LOGIT).double()
    A = _normalise(M)
    pruned_infl = weight.clone()
    cur = weight @ A
    while bool(cur.any()):  # the layered graph makes A nilpotent: this ends
        pruned_infl += cur
        cur = cur @ A
    scores = A * pruned_infl[:, None]
    edge_mask = scores >= find_threshold(scores, edge_threshold)
    edge_mask &= M != 0
    k_kind = graph.kind[keep]
    is_src = ~((k_kind == LOGIT) | (k_kind == EMBEDDING))
    is_lat = k_kind == LATENT
    alive = torch.ones(len(keep), dtype=torch.bool)
    while True:
        new = alive.clone()
        new[is_src] &= edge_mask[:, is_src].any(0)  # must feed something
        new[is_lat] &= edge_mask[is_lat].any(1)  # must be fed
        if bool((new == alive).all()):
            break
        alive = new
        edge_mask[~alive] = False
        edge_mask[:, ~alive] = False
    dst, src = edge_mask.nonzero(as_tuple=True)
    edges = [(int(keep[s]), int(keep[t]), float(M[t, s])) for t, s in zip(dst, src)]
    order = torch.sort(infl, descending=True)
    cum = torch.cumsum(order.values, 0) / order.values.sum().clamp_min(1e-30)
    cumulative = torch.zeros_like(infl)
    cumulative[order.indices] = cum
    return Pruned(nodes=keep[alive], edges=edges, influence=infl, cumulative=cumulative,
                  node_threshold=node_threshold, edge_threshold=edge_threshold)
