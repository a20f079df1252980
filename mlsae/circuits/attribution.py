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
    block_vjp,
    clean_sources,
    frozen_forward,
    logit_gradient,
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
    """What the graph explains: `direction @ logits[-1]`, a logit (`contrast` None) or
    the difference logit(token) - logit(contrast)."""

    metric: str
    token: int
    token_str: str
    contrast: int | None = None
    contrast_str: str | None = None

    def direction(self, vocab: int) -> Tensor:
        d = torch.zeros(vocab)
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
    """The source nodes a chain of blocks ends on: a spliced layer, or the embeddings."""

    layer: int | None
    latent_ids: Tensor | None = None  # node ids [n_active]
    latent_at: tuple[Tensor, Tensor] | None = None  # (row i, slot j) of each active latent
    error_ids: Tensor | None = None  # [n_inc]
    exc_ids: Tensor | None = None  # [n_exc]
    exc_pos: Tensor | None = None
    emb_ids: Tensor | None = None  # [T]


def _layer_nodes(nodes: _Nodes, sae: MLSAE, cap: Capture, v: int) -> _Level:
    lc = cap.codes[v]
    inc_pos = lc.inc.nonzero()[:, 0]
    active = lc.code.acts > 0  # the code may be padded with zeros: active means > 0
    rows, slots = active.nonzero(as_tuple=True)
    lat_ids = nodes.add(LATENT, v, inc_pos[rows], lc.code.idx[rows, slots],
                        lc.code.acts[rows, slots])
    err_ids = nodes.add(ERROR, v, inc_pos, None, lc.err.norm(dim=-1))
    exc_pos = (~lc.inc).nonzero()[:, 0]
    exc_ids = nodes.add(ERROR, v, exc_pos, None, lc.x[exc_pos].norm(dim=-1))
    return _Level(layer=v, latent_ids=lat_ids, latent_at=(rows, slots), error_ids=err_ids,
                  exc_ids=exc_ids, exc_pos=exc_pos)


def _source_edges(sae: MLSAE, cap: Capture, lev: _Level, G: Tensor) -> tuple[Tensor, Tensor]:
    """(source node ids, edges `[n, n_src]`) of gradients `G [n, T, d]` w.r.t. the output
    of the level's layer (or the embeddings)."""
    if lev.layer is None:
        return lev.emb_ids, torch.einsum("ntd,td->nt", G, cap.emb)
    lc = cap.codes[lev.layer]
    inc_pos = lc.inc.nonzero()[:, 0]
    Gi = G[:, inc_pos]  # [n, n_inc, d]
    rows, slots = lev.latent_at
    # d x_hat / d a_u = out_scale(std) * W_dec[u] (mu and std frozen): one batched product
    # per position, [n_inc, n, d] @ [n_inc, d, width]
    dirs = sae.W_dec.float()[lc.code.idx] * sae.out_scale(lc.code.std)[..., None]
    per = torch.bmm(Gi.transpose(0, 1), dirs.transpose(1, 2))  # [n_inc, n, width]
    lat = per[rows, :, slots].T * lc.code.acts[rows, slots]
    err = torch.einsum("nid,id->ni", Gi, lc.err)
    exc = torch.einsum("ned,ed->ne", G[:, lev.exc_pos], lc.x[lev.exc_pos])
    return (torch.cat([lev.latent_ids, lev.error_ids, lev.exc_ids]),
            torch.cat([lat, err, exc], dim=1))


def _chain(lm: LanguageModel, sae: MLSAE, cap: Capture, G: Tensor, top: int, lev: _Level,
           mode: str, mlp_ids: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """Edges into targets with gradients `G [n, T, d]` at the output of block `top`, from
    the level below (and, in frozen-mlp mode, the MLP nodes of the blocks in between)."""
    bottom = 0 if lev.layer is None else lev.layer + 1
    srcs, ws = [], []
    for b in range(top, bottom - 1, -1):
        if mode == "frozen-mlp":  # out = r + mlp_out: its gradient is G itself
            srcs.append(mlp_ids[b])
            ws.append(torch.einsum("ntd,td->nt", G, cap.mlp_out[b]))
        G = block_vjp(lm, cap, b, G, mode)
    s, w = _source_edges(sae, cap, lev, G)
    return torch.cat([s] + srcs[::-1]), torch.cat([w] + ws[::-1], dim=1)


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
    levels = [_Level(layer=None, emb_ids=emb_ids)]
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
            G = torch.zeros(len(f[sl]), T, sae.d_model, device=enc.device)
            G[torch.arange(len(f[sl])), pos[sl]] = enc[:, f[sl]].T * scale[sl]
            src, w = _chain(lm, sae, cap, G, v, below, mode, mlp_ids)
            parts.append(w)
        if parts:
            blocks.append(EdgeBlock(level=j + 1, tgt=lev.latent_ids, src=src,
                                    W=torch.cat(parts).cpu()))
        bar.update()
    G = logit_gradient(lm, cap, direction)[None]
    src, w = _chain(lm, sae, cap, G, n_blocks - 1, levels[-1], mode, mlp_ids)
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
