"""Attribution graphs as JSON files in circuit-tracer's / Neuronpedia's schema
(`circuit_tracer.frontend.graph_models`: Metadata, QParams, Node, links as {source, target,
weight}), so their graph viewers read them. Uses mlsae.circuits.attribution and .influence.

Each node carries circuit-tracer's fields (node_id, feature, layer, ctx_idx, feature_type,
token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence: the
cumulative influence score as circuit-tracer writes it, activation) and ONE extra field,
`mlsae`: {"kind", "latent" (the latent id, the same at every layer: the MLSAE's cross-layer
identity; null for other nodes), "influence" (the raw influence on the target), "effect" (a
latent's integrated-gradients effect on the metric in the real model, `effects.py`; null for
other nodes or when not computed)}. The
metadata carries circuit-tracer's keys and an `mlsae` object with the mode, the target, the
checks and the causal metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import Tensor

from mlsae.circuits.attribution import EMBEDDING, ERROR, KINDS, LATENT, LOGIT, MLP, Graph
from mlsae.circuits.influence import Pruned

FEATURE_TYPES = {LATENT: "cross layer transcoder", ERROR: "mlp reconstruction error",
                 MLP: "mlp reconstruction error", EMBEDDING: "embedding", LOGIT: "logit"}


def process_token(token: str) -> str:
    """circuit-tracer's display form of a token."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def node_id(graph: Graph, i: int) -> str:
    kind, layer, pos = int(graph.kind[i]), int(graph.layer[i]), int(graph.pos[i])
    if kind == LATENT:
        return f"{layer}_{int(graph.latent[i])}_{pos}"
    if kind == ERROR:
        return f"err_{layer}_{pos}"
    if kind == MLP:
        return f"mlp_{layer}_{pos}"
    if kind == EMBEDDING:
        return f"E_{graph.ids[pos]}_{pos}"
    return f"{graph.n_blocks + 1}_{graph.target.token}_{pos}"


def node_json(graph: Graph, pruned: Pruned, i: int, effects: Tensor | None = None) -> dict:
    kind, layer, pos = int(graph.kind[i]), int(graph.layer[i]), int(graph.pos[i])
    nid = node_id(graph, i)
    out = {"node_id": nid, "feature": int(graph.latent[i]) if kind == LATENT else -1,
           "layer": str(layer), "ctx_idx": pos, "feature_type": FEATURE_TYPES[kind],
           "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
           "jsNodeId": nid, "clerp": "", "influence": float(pruned.cumulative[i]),
           "activation": float(graph.activation[i])}
    if kind == EMBEDDING:
        out.update(feature=pos, layer="E", jsNodeId=f"E_{graph.ids[pos]}-{pos}",
                   activation=None)
    elif kind == MLP:
        out["clerp"] = f"MLP output of block {layer}"
    elif kind == ERROR:
        out["clerp"] = (f"SAE error at layer {layer}" if graph.included[pos] else
                        f"resid_post at layer {layer} (position excluded from the SAE)")
    elif kind == LOGIT:
        t = graph.target
        what = (f'"{process_token(t.token_str)}"' if t.contrast is None else
                f'"{process_token(t.token_str)}" - "{process_token(t.contrast_str or "")}"')
        out.update(feature=t.token, layer=str(graph.n_blocks + 1), is_target_logit=True,
                   token_prob=graph.probability, jsNodeId=f"L_{t.token}-{pos}",
                   clerp=f"Output {what} (p={graph.probability:.3f})")
    out["mlsae"] = {"kind": KINDS[kind], "latent": int(graph.latent[i]) if kind == LATENT
                    else None, "influence": float(pruned.influence[i]),
                    "effect": float(effects[i]) if effects is not None and kind == LATENT
                    else None}
    return out


def graph_json(graph: Graph, pruned: Pruned, slug: str, scan: str, extra: dict,
               effects: Tensor | None = None) -> dict:
    """The pruned graph as circuit-tracer's `Model`; `extra` goes into metadata.mlsae;
    `effects [n_nodes]` (`effects.integrated_effects`) into each latent's mlsae.effect."""
    nodes = [node_json(graph, pruned, i, effects) for i in pruned.nodes.tolist()]
    ids = {i: n["node_id"] for i, n in zip(pruned.nodes.tolist(), nodes)}
    links = [{"source": ids[s], "target": ids[t], "weight": w} for s, t, w in pruned.edges
             if s in ids and t in ids]
    t = graph.target
    meta = {"slug": slug, "scan": scan, "transcoder_list": [],
            "prompt_tokens": [process_token(s) for s in graph.tokens], "prompt": graph.prompt,
            "node_threshold": pruned.node_threshold,
            "mlsae": {"mode": graph.mode, "layers": graph.layers, "n_blocks": graph.n_blocks,
                      "target": {"metric": t.metric, "token": t.token, "token_str": t.token_str,
                                 "contrast": t.contrast, "contrast_str": t.contrast_str,
                                 "value": float(graph.value[graph.target_node]),
                                 "probability": graph.probability},
                      "edge_threshold": pruned.edge_threshold, "included": graph.included,
                      "checks": graph.checks, "timing": graph.timing,
                      "full_graph": {"nodes": graph.n_nodes, "edges": graph.edge_count()},
                      "pruned_graph": {"nodes": len(nodes), "links": len(links),
                                       "latents": sum(n["mlsae"]["kind"] == "latent"
                                                      for n in nodes)},
                      **extra}}
    return {"metadata": meta,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                        "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def write_json(data: dict, path: str | Path) -> Path:
    """Write `data` to `path` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_graph_metadata(meta: dict, folder: str | Path) -> Path:
    """Add (or replace, by slug) a graph's metadata in `folder/graph-metadata.json`, the
    index circuit-tracer's local viewer reads."""
    path = Path(folder) / "graph-metadata.json"
    index = json.loads(path.read_text()) if path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != meta["slug"]]
    index["graphs"].append({k: v for k, v in meta.items() if k != "mlsae"})
    return write_json(index, path)


def read_graph(path: str | Path) -> dict:
    """A graph file as written by `graph_json` (plain dicts)."""
    return json.loads(Path(path).read_text())
