"""Each latent node's causal effect on the target metric in the REAL model, estimated by
integrated gradients (Marks et al. 2024's IE_ig), for ranking latents by what mean ablation
will do to the metric. Uses mlsae.circuits.linear and .attribution (plus the SAE).

The path runs from every latent node mean-ablated (alpha = 0) to the clean prompt (alpha = 1):
at every spliced layer each latent of the prompt's active set takes the value
    mean + alpha * (relu(pre(x)) - mean),
with pre(x) its encoder pre-activation on what arrives at that layer (so a change below moves
the codes above, as in the causal checks), the clean error term added, every latent outside
the active set 0. A node's effect is the integral over alpha of d(metric)/d(value) times the
explicit rate of change of its value, (relu(pre(x)) - mean), by the midpoint rule with `steps`
points. By the chain rule the effects sum to m(clean) - m(every latent node ablated), up to
the quadrature error: the JSON records that sum as a check. Where gradient x activation (the
graph's edges and influence) is a local reading at the clean prompt, the effect reads the
whole path that faithfulness measures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlsae.circuits.attribution import LATENT, Graph
from mlsae.circuits.linear import Capture, active_pre, splice_output
from mlsae.lm import LanguageModel
from mlsae.sae import MLSAE, SparseCode


def latent_slots(graph: Graph, cap: Capture, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """(row, slot) in their layer's code of latent `nodes` (all at one layer)."""
    lc = cap.codes[int(graph.layer[nodes[0]])]
    rows = (lc.inc.long().cumsum(0) - 1).cpu()[graph.pos[nodes]]
    hit = ((lc.code.idx.cpu()[rows] == graph.latent[nodes][:, None])
           & (lc.code.acts.cpu()[rows] > 0))
    if not bool(hit.any(-1).all()):
        raise ValueError("a node is not an active latent of its layer's code")
    return rows, hit.float().argmax(-1)


def path_point(sae: MLSAE, lm: LanguageModel, cap: Capture, means: Tensor,
               direction: Tensor, alpha: float | dict[int, Tensor]
               ) -> tuple[float, dict[int, Tensor]]:
    """The metric at `alpha` on the path and, per spliced layer, d(metric)/d(value) times
    the value's explicit rate (relu(pre) - mean) `[n_inc, width]`: the first-order change
    of the metric if a node went from its mean to its value. `alpha` may differ per node
    (`{layer: [n_inc, width]}`, e.g. 1 kept, 0 mean-ablated)."""
    handles, state = [], {}

    def hook_for(i: int, v: int):
        lc = cap.codes[v]
        on = (lc.code.acts > 0)[None]

        def hook(_m, _a, o):
            h = o[0] if isinstance(o, tuple) else o
            x = h.float()[:, lc.inc]  # [1, n_inc, d]
            xt, mu, std = sae.preprocess(x)
            enc = torch.where(on, active_pre(sae, lc, xt).clamp_min(0), 0.0)
            mean = torch.where(on, means[i].to(x.device)[lc.code.idx][None], 0.0)
            rate = enc - mean
            # a zero leaf after the value: its gradient is d(metric)/d(value), downstream
            # of this layer included (the codes above re-encode what arrives)
            probe = torch.zeros_like(rate, requires_grad=True)
            state[v] = (probe, rate.detach()[0])
            a = alpha[v][None].to(x.device) if isinstance(alpha, dict) else alpha
            recon = sae.decode(SparseCode(mean + a * rate + probe, lc.code.idx[None], mu, std))
            return splice_output(o, lc, recon)

        return hook

    for i, v in enumerate(cap.layers):
        handles.append(lm.blocks[v].register_forward_hook(hook_for(i, v)))
    wants = [p.requires_grad for p in sae.parameters()]
    sae.requires_grad_(False)  # only the probes' gradients are wanted: no W_dec gradient
    try:
        with torch.enable_grad():
            logits = lm.model(input_ids=cap.ids, use_cache=False,
                              logits_to_keep=1).logits[0, -1].float()
            metric = logits @ direction.to(logits.device)
            grads = torch.autograd.grad(metric, [state[v][0] for v in cap.layers])
    finally:
        for h in handles:
            h.remove()
        for p, want in zip(sae.parameters(), wants):
            p.requires_grad_(want)
    return float(metric.detach()), {v: g[0].detach() * state[v][1]
                                    for v, g in zip(cap.layers, grads)}


def integrated_effects(sae: MLSAE, lm: LanguageModel, cap: Capture, graph: Graph,
                       means: Tensor, steps: int = 8) -> tuple[Tensor, dict]:
    """`[n_nodes]` float64: each latent node's integrated-gradients effect on the graph's
    metric (module docstring; 0 for the other nodes), and a description with the effects'
    sum (to compare with m(clean) - m(every latent ablated))."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    direction = graph.target.direction(cap.logits.shape[-1])
    per_layer = {v: torch.zeros(cap.codes[v].code.idx.shape) for v in cap.layers}
    for j in range(steps):
        _, part = path_point(sae, lm, cap, means, direction, (j + 0.5) / steps)
        for v in cap.layers:
            per_layer[v] += part[v].cpu() / steps
    out = torch.zeros(graph.n_nodes, dtype=torch.float64)
    latents = (graph.kind == LATENT).nonzero()[:, 0]
    for v in cap.layers:
        at = latents[graph.layer[latents] == v]
        if len(at):
            rows, slots = latent_slots(graph, cap, at)
            out[at] = per_layer[v][rows, slots].double()
    return out, {"method": "integrated gradients, every latent node from its mean to its "
                           "clean value", "steps": steps, "sum": float(out.sum())}
