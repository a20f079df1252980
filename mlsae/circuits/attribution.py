"""Attribution graphs over MLSAE latents: the nodes of one prompt and the edges between them,
read from the linearised model (`linear.py`). Uses mlsae.circuits.linear only (plus the SAE).

Nodes: every active latent at every spliced layer and included position ("latent"); one error
node per (layer, position) (the SAE's error x - x_hat; at an excluded position the whole
resid_post, which the SAE never replaces); the input embeddings ("embedding"); in
`frozen-mlp` mode one node per (block, position) holding that MLP's output ("mlp"); and one
target ("logit": a logit, or the difference of two logits).

Edges (SPEC §9): from each node at spliced layer l (and from the MLP nodes of blocks l+1..l')
into each latent at the next spliced layer l', from the embeddings into the first spliced
layer, and from the last spliced layer into the target; weight = a_u * d(pre_v)/d(a_u) in
the linearised model, with pre_v a latent's encoder pre-activation (its activation, the active
set being frozen) or the target metric. All edges into the nodes of one layer come from one
batch of vector-Jacobian products (`linear.block_vjp`), in chunks of targets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mlsae.circuits.linear import (
    Capture,
    SourceSet,
    block_edges,
    block_vjp,
    clean_sources,
    frozen_forward,
    logit_gradient,
    same_position,
    zero_sources,
)
from mlsae.lm import LanguageModel
from mlsae.sae import MLSAE

KINDS = ("latent", "error", "mlp", "embedding", "logit")
LATENT, ERROR, MLP, EMBEDDING, LOGIT = range(len(KINDS))
CHUNK = 256  # targets per batch of VJPs: [CHUNK, T, d] gradients at a time


@dataclass
class EdgeBlock:
    """All edges into one level of targets: `W [n_tgt, n_src]` (rows: targets `tgt`, node
    ids; columns: sources `src`). `level` orders blocks bottom-up (the target is last)."""

    level: int
    tgt: Tensor
    src: Tensor
    W: Tensor


@dataclass
class Target:
    """What the graph explains: `direction @ logits[-1]` at the last position. Metric
    "logit": the token's logit minus the mean logit over the vocabulary (as circuit-tracer
    de-means its logit targets: a shift of every logit is no evidence for the token);
    "logit-diff": logit(token) - logit(contrast)."""

    metric: str
    token: int
    token_str: str
    contrast: int | None = None
    contrast_str: str | None = None

    def direction(self, vocab: int) -> Tensor:
        d = torch.zeros(vocab)
        if self.contrast is None:
            d -= 1.0 / vocab
        d[self.token] += 1.0
        if self.contrast is not None:
            d[self.contrast] -= 1.0
        return d


@dataclass
class Graph:
    """One prompt's attribution graph. Node arrays are parallel `[n_nodes]` tensors: `kind`
    (index into KINDS), `layer` (LM block; -1 embeddings; the block count for the target),
    `pos`, `latent` (-1 for non-latents), `activation` (latents: the activation; error and
    mlp nodes: the vector's norm; embeddings: its norm; target: the metric), `value` (what
    the node's incoming edges explain: a latent's pre-activation, the metric; NaN for pure
    sources) and `bias` (frozen-mlp: the target's value with every source node at zero, so
    value = sum of incoming edges + bias exactly; NaN otherwise)."""

    prompt: str
    ids: list[int]
    tokens: list[str]
    included: list[bool]
    mode: str
    layers: list[int]
    n_blocks: int
    target: Target
    kind: Tensor
    layer: Tensor
    pos: Tensor
    latent: Tensor
    activation: Tensor
    value: Tensor
    bias: Tensor
    blocks: list[EdgeBlock]
    checks: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    probability: float = 0.0

    @property
    def n_nodes(self) -> int:
        return int(self.kind.shape[0])

    @property
    def target_node(self) -> int:
        return int((self.kind == LOGIT).nonzero()[0, 0])

    def incoming(self, node: int) -> tuple[Tensor, Tensor]:
        """(source node ids, weights) of the edges into `node`."""
        for blk in self.blocks:
            hit = (blk.tgt == node).nonzero()
            if len(hit):
                return blk.src, blk.W[int(hit[0, 0])]
        return torch.empty(0, dtype=torch.long), torch.empty(0)

    def edge_count(self) -> int:
        return sum(int((b.W != 0).sum()) for b in self.blocks)


class _Nodes:
    """Node table under construction."""

    def __init__(self):
        self.cols: dict[str, list] = {k: [] for k in ("kind", "layer", "pos", "latent", "act")}

    def add(self, kind: int, layer: int, pos: Tensor | list, latent: Tensor | list | None,
            act: Tensor | list) -> Tensor:
        pos = torch.as_tensor(pos).long().reshape(-1).cpu()
        n = len(pos)
        start = len(self.cols["kind"])
        self.cols["kind"] += [kind] * n
        self.cols["layer"] += [layer] * n
        self.cols["pos"] += pos.tolist()
        self.cols["latent"] += (torch.as_tensor(latent).reshape(-1).tolist() if latent is not None
                                else [-1] * n)
        self.cols["act"] += torch.as_tensor(act, dtype=torch.float32).reshape(-1).tolist()
        return torch.arange(start, start + n)

    def tensors(self) -> dict[str, Tensor]:
        return {"kind": torch.tensor(self.cols["kind"], dtype=torch.long),
                "layer": torch.tensor(self.cols["layer"], dtype=torch.long),
                "pos": torch.tensor(self.cols["pos"], dtype=torch.long),
                "latent": torch.tensor(self.cols["latent"], dtype=torch.long),
                "activation": torch.tensor(self.cols["act"], dtype=torch.float32)}


@dataclass
class _Level:
    """The source nodes a chain of blocks ends on (a spliced layer, or the embeddings), as
    node ids, positions and the vectors they add to that layer's output: a latent adds
    a_u * out_scale(std) * W_dec[u] (the derivative of x_hat in a_u, mu and std frozen,
    times a_u), an error node its error, an excluded position its whole resid_post, an
    embedding its embedding."""

    layer: int | None
    ids: Tensor
    src: SourceSet
    latent_ids: Tensor | None = None  # node ids [n_active]
    latent_at: tuple[Tensor, Tensor] | None = None  # (row i, slot j) of each active latent


def _layer_nodes(nodes: _Nodes, sae: MLSAE, cap: Capture, v: int) -> _Level:
    lc = cap.codes[v]
    inc_pos = lc.inc.nonzero()[:, 0]
    active = lc.code.acts > 0  # the code may be padded with zeros: active means > 0
    rows, slots = active.nonzero(as_tuple=True)
    f, a = lc.code.idx[rows, slots], lc.code.acts[rows, slots]
    lat_ids = nodes.add(LATENT, v, inc_pos[rows], f, a)
    err_ids = nodes.add(ERROR, v, inc_pos, None, lc.err.norm(dim=-1))
    exc_pos = (~lc.inc).nonzero()[:, 0]
    exc_ids = nodes.add(ERROR, v, exc_pos, None, lc.x[exc_pos].norm(dim=-1))
    S_lat = sae.W_dec.float()[f] * (sae.out_scale(lc.code.std[rows]) * a[:, None])
    pos = torch.cat([inc_pos[rows], inc_pos, exc_pos]).to(lc.x.device)
    return _Level(layer=v, ids=torch.cat([lat_ids, err_ids, exc_ids]),
                  src=SourceSet(torch.cat([S_lat, lc.err, lc.x[exc_pos]]), pos, cap.n_pos),
                  latent_ids=lat_ids, latent_at=(rows, slots))


def _contract(G: Tensor, lev: _Level) -> Tensor:
    """Edges `[n, n_src]` from gradients `G [n, T, d]` at the level's output."""
    return lev.src.scatter(torch.einsum("ntd,twd->ntw", G, lev.src.S_pad))


def _chain(lm: LanguageModel, cap: Capture, g: Tensor, t: Tensor, top: int, lev: _Level,
           mode: str, mlp_ids: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """(source node ids, edges `[n, n_src]`) into targets with gradients `g [n, d]` at
    positions `t [n]` of block `top`'s output, from the level below (and, in frozen-mlp mode,
    the MLP nodes of the blocks in between, each MLP output being added to the residual so
    that its gradient is the block output's)."""
    bottom = 0 if lev.layer is None else lev.layer + 1
    if top < bottom:  # the level is the targets' own layer
        return lev.ids, same_position(g, t, lev.src)
    if top == bottom:  # one block: contract without [n, T, d] gradients
        E, g_mlp = block_edges(lm, cap, top, g, t, lev.src, mode)
        if g_mlp is None:
            return lev.ids, E
        E_mlp = torch.zeros(len(g), cap.n_pos, dtype=E.dtype, device=E.device)
        E_mlp[torch.arange(len(g)), t] = (g_mlp * cap.mlp_out[top][t]).sum(-1)
        return torch.cat([lev.ids, mlp_ids[top]]), torch.cat([E, E_mlp], dim=1)
    G = torch.zeros(len(g), cap.n_pos, g.shape[-1], dtype=g.dtype, device=g.device)
    G[torch.arange(len(g)), t] = g
    srcs, ws = [], []
    for b in range(top, bottom - 1, -1):
        if mode == "frozen-mlp":
            srcs.append(mlp_ids[b])
            ws.append(torch.einsum("ntd,td->nt", G, cap.mlp_out[b]))
        G = block_vjp(lm, cap, b, G, mode)
    return torch.cat([lev.ids] + srcs[::-1]), torch.cat([_contract(G, lev)] + ws[::-1], dim=1)


@torch.no_grad()
def attribute(sae: MLSAE, lm: LanguageModel, cap: Capture, target: Target, mode: str,
              prompt: str = "", progress: bool = False) -> Graph:
    """The full (unpruned) attribution graph of `cap`'s prompt for `target`, plus the
    checks that need no pruning: the frozen model reproduces the clean logits and
    activations, and (frozen-mlp) each target's value = incoming edges + bias."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    nodes = _Nodes()
    T = cap.n_pos
    emb_ids = nodes.add(EMBEDDING, -1, torch.arange(T), None, cap.emb.norm(dim=-1))
    levels = [_Level(layer=None, ids=emb_ids,
                     src=SourceSet(cap.emb, torch.arange(T, device=cap.emb.device), T))]
    levels += [_layer_nodes(nodes, sae, cap, v) for v in cap.layers]
    mlp_ids = {}
    if mode == "frozen-mlp":
        for b in range(len(lm.blocks)):
            mlp_ids[b] = nodes.add(MLP, b, torch.arange(T), None, cap.mlp_out[b].norm(dim=-1))
    n_blocks = len(lm.blocks)
    direction = target.direction(cap.logits.shape[-1]).to(cap.logits.device)
    metric = float(cap.logits[-1] @ direction)
    logit_id = nodes.add(LOGIT, n_blocks, [T - 1], None, [metric])
    blocks: list[EdgeBlock] = []
    enc = sae.W_enc.float()
    bar = tqdm(total=len(cap.layers) + 1, desc="graph", unit="layer", disable=not progress)
    for j, v in enumerate(cap.layers):  # edges into the latents of layer v
        lev, lc = levels[j + 1], cap.codes[v]
        below = levels[j]
        rows, slots = lev.latent_at
        pos = lc.inc.nonzero()[:, 0][rows]
        f = lc.code.idx[rows, slots]
        scale = 1.0 / (lc.code.std[rows] + sae.eps)  # d pre / d x = W_enc[:, f] / (std + eps)
        parts, src = [], None
        for c in range(0, len(f), CHUNK):
            sl = slice(c, c + CHUNK)
            g = enc[:, f[sl]].T * scale[sl]
            src, w = _chain(lm, cap, g, pos[sl], v, below, mode, mlp_ids)
            parts.append(w)
        if parts:
            blocks.append(EdgeBlock(level=j + 1, tgt=lev.latent_ids, src=src,
                                    W=torch.cat(parts).cpu()))
        bar.update()
    g = logit_gradient(lm, cap, direction)[-1:]
    t = torch.tensor([T - 1], device=g.device)
    src, w = _chain(lm, cap, g, t, n_blocks - 1, levels[-1], mode, mlp_ids)
    blocks.append(EdgeBlock(level=len(cap.layers) + 1, tgt=logit_id, src=src, W=w.cpu()))
    bar.update()
    bar.close()
    t1 = time.perf_counter()
    cols = nodes.tensors()
    n = len(cols["kind"])
    value = torch.full((n,), float("nan"))
    bias = torch.full((n,), float("nan"))
    for j, v in enumerate(cap.layers):
        rows, slots = levels[j + 1].latent_at
        value[levels[j + 1].latent_ids] = cap.codes[v].code.acts[rows, slots].cpu()
    value[logit_id] = metric
    checks = _frozen_checks(sae, lm, cap, mode, levels, direction, value, bias, logit_id)
    tok = lm.tokenizer
    ids = cap.ids[0].tolist()
    inc = torch.zeros(T, dtype=torch.bool)
    for lc in cap.codes.values():
        inc |= lc.inc.cpu()
    graph = Graph(prompt=prompt, ids=ids, tokens=[tok.decode([i]) for i in ids],
                  included=inc.tolist(), mode=mode, layers=list(cap.layers),
                  n_blocks=n_blocks, target=target, value=value, bias=bias, blocks=blocks,
                  checks=checks, **cols)
    graph.probability = float(cap.logits[-1].log_softmax(-1)[target.token].exp())
    if mode == "frozen-mlp":
        graph.checks["additivity"] = additivity(graph)
    graph.timing = {"edges_s": t1 - t0, "checks_s": time.perf_counter() - t1}
    return graph


@torch.no_grad()
def _frozen_checks(sae: MLSAE, lm: LanguageModel, cap: Capture, mode: str,
                   levels: list[_Level], direction: Tensor, value: Tensor, bias: Tensor,
                   logit_id: Tensor) -> dict:
    """The frozen forward at the clean point reproduces the clean logits and activations;
    in frozen-mlp mode its output with every source at zero gives each target's bias."""
    clean = frozen_forward(sae, lm, cap, clean_sources(cap, mode), mode)
    checks = {"clean_logits_max_abs_diff": float((clean.logits - cap.logits).abs().max()),
              "clean_activations_max_abs_diff": max(
                  (_max_abs((clean.pre[v] - cap.codes[v].code.acts)[cap.codes[v].code.acts > 0])
                   for v in cap.layers), default=0.0)}
    if mode == "frozen-mlp":
        zero = frozen_forward(sae, lm, cap, zero_sources(cap, mode), mode)
        for j, v in enumerate(cap.layers):
            rows, slots = levels[j + 1].latent_at
            bias[levels[j + 1].latent_ids] = zero.pre[v][rows, slots].cpu()
        bias[logit_id] = float(zero.logits[-1] @ direction)
    return checks


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def additivity(graph: Graph) -> dict:
    """frozen-mlp: |value - (sum of incoming edges + bias)| over all targets, absolute and
    relative to the largest |value|."""
    err, scale = 0.0, 0.0
    for blk in graph.blocks:
        got = blk.W.sum(1) + graph.bias[blk.tgt]
        want = graph.value[blk.tgt]
        err = max(err, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return {"max_abs_error": err, "max_rel_error": err / max(scale, 1e-12)}
