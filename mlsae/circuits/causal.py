"""Causal checks of an attribution graph, computed on the REAL model (not the linearised one),
plus the frozen-mlp exactness check on the linearised one. Uses mlsae.circuits.attribution,
.effects and .linear, and runs (for the held-out text the means come from).

Faithfulness and completeness (Marks et al. 2024, SPEC §9): with m the target metric,
    F(C) = (m(C) - m(empty)) / (m(M) - m(empty)),
m(C) the metric when the graph's latent nodes (the latents active on the prompt, each at its
layer and position) outside circuit C are replaced by their MEAN activation at that layer
(over a small slice of the run's held-out text, zeros included), and C's keep their values;
m(M): nothing replaced (the clean model); m(empty): every latent node replaced. Completeness
is the same number with C's latents replaced and the rest kept (near 0: C holds what
matters). A layer's latents are re-encoded from what arrives there, so an ablation below
changes the codes above; latents that are not nodes (inactive on the clean prompt) keep what
the SAE encodes (ablating them to their means too would move even the full graph away from
the clean model: a graph built from gradient x activation has no node for them). The SAE's
error term is kept at its clean value at every layer (the graph treats error nodes as fixed
sources), so m(M) is the clean metric and F(all latent nodes) = 1.

Exactness (frozen-mlp mode): scaling one source node's value by s changes each of its direct
targets' values by (s - 1) x the edge weight, exactly, in the frozen model's own forward
(`linear.frozen_forward`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlsae.activations.capture import exclude_outliers
from mlsae.circuits.attribution import EMBEDDING, ERROR, LATENT, MLP, Graph
from mlsae.circuits.effects import latent_slots
from mlsae.circuits.linear import (
    Capture,
    active_pre,
    clean_sources,
    frozen,
    frozen_forward,
    splice_output,
)
from mlsae.data import include_mask
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE, SparseCode

CURVE_SIZES = (10, 20, 50, 100, 200, 500, 1000, 2000)


@torch.no_grad()
def latent_means(sae: MLSAE, lm: LanguageModel, layers: list[int], tokens: int = 2048,
                 batch_size: int = 4) -> tuple[Tensor, dict]:
    """Mean activation `[layer, n_latents]` of every latent at each of `layers` over the
    included positions of the first `tokens` tokens of the run's held-out split (zeros
    counted), and a description of that text."""
    cfg, batches, n_tok = eval_batches(sae, lm, TextOptions(tokens=tokens,
                                                            batch_size=batch_size))
    sums = torch.zeros(len(layers), sae.n_latents, dtype=torch.float64)
    count = 0
    for ids in batches:
        resid = lm.resid_post(ids, layers)  # [layer, batch, T, d]
        mask = include_mask(ids, lm.special_ids, cfg)
        mask = exclude_outliers(resid.cpu(), mask, cfg).to(resid.device)
        for i in range(len(layers)):
            code = sae.encode(resid[i][mask])
            sums[i].index_add_(0, code.idx.flatten().cpu(), code.acts.flatten().double().cpu())
        count += int(mask.sum())
    info = {"text": "the run's held-out split" if cfg.eval_dataset is None else
            str(cfg.eval_dataset), "tokens": n_tok, "included_positions": count,
            "ctx_len": cfg.ctx_len}
    return (sums / max(count, 1)).float(), info


def _ablate_masks(graph: Graph, cap: Capture, nodes: Tensor, n_latents: int
                  ) -> dict[int, Tensor]:
    """Per spliced layer `[T, n_latents]` bool: True at the latent nodes `nodes`."""
    masks = {v: torch.zeros(cap.n_pos, n_latents, dtype=torch.bool) for v in cap.layers}
    for v in cap.layers:
        at = nodes[graph.layer[nodes] == v]
        masks[v][graph.pos[at], graph.latent[at]] = True
    return masks


ACTIVE_SETS = ("frozen", "re-encoded")
MODELS = ("real", "linearised")


BATCH = 8  # ablation runs per LM forward


@torch.no_grad()
def ablated_metric(sae: MLSAE, lm: LanguageModel, cap: Capture, means: Tensor,
                   ablate: dict[int, Tensor] | None, direction: Tensor,
                   active_set: str = "frozen", model: str = "real",
                   mode: str = "jacobian") -> float:
    """The metric with, at every spliced layer, the latents in `ablate` replaced by their
    means (None: nothing replaced) and the clean error term added.
    `active_set` "frozen": each layer's code keeps the prompt's active set (the graph's
    nodes), each active latent's value being its ReLU'd pre-activation on what arrives
    there, every other latent 0; "re-encoded": the SAE encodes what arrives there (new
    latents may become active; they are never ablated).
    `model` "real": the LM as it is; "linearised": the graph's own model (attention
    patterns, norm scales and the SAE's mu and std frozen at the prompt, an active latent's
    value its pre-activation; in frozen-mlp `mode` the MLP outputs fixed too), as
    circuit-tracer's constrained interventions freeze patterns and norm denominators."""
    return ablated_metrics(sae, lm, cap, means, [ablate], direction, active_set, model,
                           mode)[0]


@torch.no_grad()
def ablated_metrics(sae: MLSAE, lm: LanguageModel, cap: Capture, means: Tensor,
                    ablates: list[dict[int, Tensor] | None], direction: Tensor,
                    active_set: str = "frozen", model: str = "real",
                    mode: str = "jacobian") -> list[float]:
    """`ablated_metric` of several ablations, BATCH at a time in one batched LM forward
    (each batch row one ablation; rows never mix: attention stays within a row)."""
    if active_set not in ACTIVE_SETS:
        raise ValueError(f"active_set {active_set!r}: choose one of {ACTIVE_SETS}")
    if model not in MODELS:
        raise ValueError(f"model {model!r}: choose one of {MODELS}")
    out: list[float] = []
    for c in range(0, len(ablates), BATCH):
        out += _ablated_batch(sae, lm, cap, means, ablates[c:c + BATCH], direction,
                              active_set, model == "linearised", mode)
    return out


def _ablated_batch(sae: MLSAE, lm: LanguageModel, cap: Capture, means: Tensor,
                   ablates: list[dict[int, Tensor] | None], direction: Tensor,
                   active_set: str, lin: bool, mode: str) -> list[float]:
    B, handles = len(ablates), []

    def hook_for(i, v):
        lc = cap.codes[v]
        idx = lc.code.idx.expand(B, -1, -1)
        on = (lc.code.acts > 0).expand(B, -1, -1)
        inc = lc.inc.cpu()
        masks = torch.stack([a[v][inc] if a is not None else
                             torch.zeros(int(inc.sum()), sae.n_latents, dtype=torch.bool)
                             for a in ablates]).to(idx.device)  # [B, n_inc, n_latents]

        def hook(_m, _a, o):
            h = o[0] if isinstance(o, tuple) else o
            x = h.float()[:, lc.inc]  # [B, n_inc, d]
            if active_set == "re-encoded" and not lin:
                code = sae.encode(x)
                dense = torch.where(masks, means[i].to(x.device), code.dense(sae.n_latents))
                recon = sae.decode_dense(dense, code)
            else:  # the clean active set: only its slots can be non-zero, or be ablated
                if lin:  # linear in x: the clean mu and std, no ReLU
                    xt = (x - lc.code.mu) / (lc.code.std + sae.eps)
                    mu, std = lc.code.mu.expand(B, -1, -1), lc.code.std.expand(B, -1, -1)
                else:
                    xt, mu, std = sae.preprocess(x)
                pre = active_pre(sae, lc, xt)  # [B, n_inc, width]
                acts = torch.where(on, pre if lin else pre.clamp_min(0), 0.0)
                acts = torch.where(masks.gather(-1, idx) & on, means[i].to(x.device)[idx],
                                   acts)
                recon = sae.decode(SparseCode(acts, idx, mu, std))
            return splice_output(o, lc, recon)

        return hook

    for i, v in enumerate(cap.layers):
        handles.append(lm.blocks[v].register_forward_hook(hook_for(i, v)))
    ids = cap.ids.expand(B, -1)
    try:
        if lin:
            with frozen(lm, cap, cap.mlp_out if mode == "frozen-mlp" else None, batch=B):
                logits = lm.model(input_ids=ids, use_cache=False,
                                  logits_to_keep=1).logits[:, -1].float()
        else:
            logits = lm.model(input_ids=ids, use_cache=False,
                              logits_to_keep=1).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return (logits @ direction.to(logits.device)).tolist()


def causal_checks(sae: MLSAE, lm: LanguageModel, cap: Capture, graph: Graph, means: Tensor,
                  circuit: Tensor, influence: Tensor,
                  sizes: tuple[int, ...] = CURVE_SIZES, active_set: str = "frozen",
                  model: str = "real", effects: Tensor | None = None) -> dict:
    """Faithfulness and completeness of `circuit` (latent node ids), and the faithfulness of
    the top-n latents by `influence` for each n in `sizes` (the curve); with `effects`
    (`[n_nodes]`, `effects.integrated_effects`) also the curve of the top-n by |effect|
    ("effect_curve") and, on the real model with the frozen active set (the effects' path),
    the effects' sum over m(M) - m(empty) ("effect_sum_ratio", 1 up to the quadrature
    error)."""
    direction = graph.target.direction(cap.logits.shape[-1])
    n_lat = sae.n_latents
    latents = (graph.kind == LATENT).nonzero()[:, 0]
    # m(M) is the clean metric (the splice with every latent kept and the clean error
    # reproduces the clean forward: tested), so no forward is spent on it
    m_full = float(cap.logits[-1] @ direction.to(cap.logits.device))

    def ablation(chosen: Tensor, invert: bool = False) -> dict[int, Tensor]:
        inside = torch.zeros(graph.n_nodes, dtype=torch.bool)
        inside[chosen] = True
        ablate = latents[inside[latents]] if invert else latents[~inside[latents]]
        return _ablate_masks(graph, cap, ablate, n_lat)

    ns = [s for s in sizes if s < len(latents)] + [len(latents)]
    orders = [latents[torch.argsort(influence[latents], descending=True)]]
    if effects is not None:
        orders.append(latents[torch.argsort(effects[latents].abs(), descending=True)])
    runs = [_ablate_masks(graph, cap, latents, n_lat), ablation(circuit),
            ablation(circuit, invert=True)] + [ablation(o[:n]) for o in orders for n in ns]
    ms = ablated_metrics(sae, lm, cap, means, runs, direction, active_set, model, graph.mode)
    m_empty, m_c, m_comp = ms[:3]
    denom = m_full - m_empty

    def faith(m: float) -> float:
        return (m - m_empty) / denom if abs(denom) > 1e-12 else float("nan")

    f_c, f_comp = faith(m_c), faith(m_comp)
    curves = [[{"latents": n, "metric": m, "faithfulness": faith(m)}
               for n, m in zip(ns, ms[3 + c * len(ns):3 + (c + 1) * len(ns)])]
              for c in range(len(orders))]
    out = {"metric_full": m_full, "metric_empty": m_empty, "metric_circuit": m_c,
           "faithfulness": f_c, "metric_without_circuit": m_comp, "completeness": f_comp,
           "circuit_latents": len(circuit), "active_set": active_set, "model": model,
           "curve": curves[0]}
    if effects is not None:
        out["effect_curve"] = curves[1]
        if active_set == "frozen" and model == "real":  # the effects' own path
            out["effect_sum_ratio"] = faith(m_empty + float(effects[latents].sum()))
    return out


def _scale_node(src, cap: Capture, graph: Graph, node: int, s: float) -> None:
    kind, v, p = int(graph.kind[node]), int(graph.layer[node]), int(graph.pos[node])
    if kind == EMBEDDING:
        src.emb[p] *= s
    elif kind == MLP:
        src.mlp[v][p] *= s
    elif kind == ERROR:
        lc = cap.codes[v]
        if bool(lc.inc[p]):
            src.err[v][int(lc.inc[:p].sum())] *= s
        else:
            src.exc[v][p] *= s
    elif kind == LATENT:
        rows, slots = latent_slots(graph, cap, torch.tensor([node]))
        src.acts[v][int(rows[0]), int(slots[0])] *= s
    else:
        raise ValueError(f"node {node} is not a source")


@torch.no_grad()
def exactness(sae: MLSAE, lm: LanguageModel, cap: Capture, graph: Graph, nodes: Tensor,
              scale: float = 2.0) -> dict:
    """frozen-mlp: for each source node in `nodes`, scale its value by `scale` in the frozen
    model's own forward and compare each direct target's change with (scale - 1) x the edge
    weight. Returns the worst absolute error and the largest predicted change."""
    base = frozen_forward(sae, lm, cap, clean_sources(cap, graph.mode), graph.mode)
    direction = graph.target.direction(cap.logits.shape[-1]).to(cap.logits.device)
    worst, biggest, checked = 0.0, 0.0, 0
    for node in nodes.tolist():
        src = clean_sources(cap, graph.mode)
        _scale_node(src, cap, graph, node, scale)
        out = frozen_forward(sae, lm, cap, src, graph.mode)
        for blk in graph.blocks:
            col = (blk.src == node).nonzero()
            if not len(col):
                continue
            want = (scale - 1.0) * blk.W[:, int(col[0, 0])]
            got = _values(graph, cap, blk.tgt, out, direction) - _values(graph, cap, blk.tgt,
                                                                         base, direction)
            worst = max(worst, float((got - want).abs().max()))
            biggest = max(biggest, float(want.abs().max()))
            checked += len(want)
    return {"scale": scale, "sources": len(nodes), "edges_checked": checked,
            "max_abs_error": worst, "max_abs_predicted": biggest,
            "max_rel_error": worst / max(biggest, 1e-12)}


def _values(graph: Graph, cap: Capture, nodes: Tensor, out, direction: Tensor) -> Tensor:
    """The frozen forward's values of target `nodes` (the latents of one layer, or the
    target metric)."""
    if int(graph.kind[nodes[0]]) == LATENT:
        rows, slots = latent_slots(graph, cap, nodes)
        return out.pre[int(graph.layer[nodes[0]])].cpu()[rows, slots]
    return (out.logits[-1] @ direction).reshape(1).cpu()
