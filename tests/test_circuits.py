"""Attribution graphs (mlsae.circuits) on a tiny random Llama (the edge tests also on the
other Llama-style families `check_supported` accepts), against independent
computations: every edge of a small graph re-measured in the LM's own forward with the frozen
quantities substituted (frozen-mlp: exact differences; jacobian: autograd through the live
MLPs, and central differences), additivity against the clean activations, influence against
the dense Neumann series, pruning against circuit-tracer's algorithm on the dense matrix,
causal metrics against a by-hand splice, the JSON read back, and the CLI's one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_lm

from mlsae.circuits import linear
from mlsae.circuits.analysis import self_edges
from mlsae.circuits.attribution import EMBEDDING, ERROR, LATENT, LOGIT, MLP, Target, attribute
from mlsae.circuits.causal import (
    _ablate_masks,
    ablated_metric,
    ablated_metrics,
    causal_checks,
    exactness,
    latent_means,
)
from mlsae.circuits.influence import dense_adjacency, node_influence, prune
from mlsae.circuits.linear import capture, clean_sources, frozen_forward
from mlsae.cli import main
from mlsae.config import DataConfig, to_dict
from mlsae.sae import MLSAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, N, K = 32, 96, 6


def make_sae(model_dir, text_file, layers=(0, 1, 2, 3)) -> MLSAE:
    g = torch.Generator().manual_seed(0)
    data = DataConfig(dataset=str(text_file), ctx_len=48)
    sae = MLSAE(D, N, K, config={"model": str(model_dir), "layers": list(layers),
                                 "exclude_first": 1, "exclude_special": True,
                                 "run": {"data": to_dict(data)}})
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, N, generator=g) / math.sqrt(D))
        sae.W_dec.copy_(sae.W_enc.T * 0.5)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.05)
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
    return sae


@pytest.fixture(scope="module")
def sae(tiny_model_dir, text_file):
    return make_sae(tiny_model_dir, text_file)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request, tiny_lm):
    """A tiny random LM of each Llama-style family `mlsae graph` linearises: Llama, Qwen2
    with non-zero q/k/v biases (HF initialises them to 0), Qwen3 (RMSNorms on queries and
    keys), Mistral."""
    if request.param == "llama":
        return tiny_lm
    lm = make_tiny_lm(request.param, n_layers=4, d=32)
    if request.param == "qwen2":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in lm.blocks:
                for proj in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.3)
    linear.check_supported(lm)
    return lm


@pytest.fixture(scope="module")
def run_dir(sae, tmp_path_factory):
    return sae.save_pretrained(tmp_path_factory.mktemp("circ") / "run")


IDS = torch.tensor([[257] + list(b"a=(b+1")])  # EOS (excluded), then 6 byte tokens
TARGET = Target("logit-diff", ord(")"), ")", ord("]"), "]")


def build(sae, lm, layers, mode):
    cap = capture(sae, lm, IDS, list(layers), DataConfig(exclude_first=1))
    return cap, attribute(sae, lm, cap, TARGET, mode)


def target_values(g, cap, out, nodes):
    """Each target node's value in a frozen forward `out` (by-hand lookup)."""
    vals = []
    for t in nodes.tolist():
        if int(g.kind[t]) == LOGIT:
            vals.append(float(out.logits[-1, TARGET.token] - out.logits[-1, TARGET.contrast]))
            continue
        lc = cap.codes[int(g.layer[t])]
        row = int(lc.inc[: int(g.pos[t])].sum())
        slot = int(((lc.code.idx[row] == int(g.latent[t])) & (lc.code.acts[row] > 0))
                   .nonzero()[0, 0])
        vals.append(float(out.pre[int(g.layer[t])][row, slot].detach()))
    return torch.tensor(vals)


def node_handle(g, cap, src, node):
    """(tensor, index) holding source `node`'s value in Sources `src`."""
    kind, v, p = int(g.kind[node]), int(g.layer[node]), int(g.pos[node])
    if kind == EMBEDDING:
        return src.emb, (p,)
    if kind == MLP:
        return src.mlp[v], (p,)
    lc = cap.codes[v]
    row = int(lc.inc[:p].sum())
    if kind == ERROR:
        return (src.err[v], (row,)) if bool(lc.inc[p]) else (src.exc[v], (p,))
    slot = int(((lc.code.idx[row] == int(g.latent[node])) & (lc.code.acts[row] > 0))
               .nonzero()[0, 0])
    return src.acts[v], (row, slot)


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 3)])
def test_frozen_mlp_every_edge_is_the_exact_difference(sae, lm, layers):
    """frozen-mlp: zeroing source u in the LM's own frozen forward moves each target by
    exactly -W[target, u], for every edge of the graph (non-adjacent layers included)."""
    cap, g = build(sae, lm, layers, "frozen-mlp")
    mode = "frozen-mlp"
    base = frozen_forward(sae, lm, cap, clean_sources(cap, mode), mode)
    checked = 0
    for blk in g.blocks:
        want_base = target_values(g, cap, base, blk.tgt)
        for c, u in enumerate(blk.src.tolist()):
            src = clean_sources(cap, mode)
            t, i = node_handle(g, cap, src, u)
            t[i] = 0.0
            out = frozen_forward(sae, lm, cap, src, mode)
            got = want_base - target_values(g, cap, out, blk.tgt)
            scale = max(1.0, float(blk.W.abs().max()))
            assert torch.allclose(got, blk.W[:, c], atol=2e-5 * scale, rtol=1e-4), (u, c)
            checked += len(got)
    assert checked == sum(b.W.numel() for b in g.blocks) > 1000
    kinds = set(g.kind.tolist())
    assert {LATENT, ERROR, MLP, EMBEDDING, LOGIT} <= kinds


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 3)])
def test_jacobian_edges_equal_autograd_through_live_mlps(sae, lm, layers, gated,
                                                         monkeypatch):
    """jacobian: W[v, u] = value_u * d value_v / d value_u, by autograd through the LM's own
    forward (frozen patterns and norms, live MLPs), and by central differences; with the
    gated-MLP formula and with the autograd path any other MLP takes."""
    if not gated:
        monkeypatch.setattr(linear, "_is_gated", lambda mlp: False)
    mode = "jacobian"
    cap, g = build(sae, lm, layers, mode)
    assert not bool((g.kind == MLP).any())
    for blk in g.blocks:
        src = clean_sources(cap, mode)
        leaves = [src.emb] + [src.acts[v] for v in cap.layers] + [src.err[v] for v in
                                                                  cap.layers] + \
            [src.exc[v] for v in cap.layers]
        for t in leaves:
            t.requires_grad_(True)
        out = frozen_forward(sae, lm, cap, src, mode)
        vals = target_values_autograd(g, cap, out, blk.tgt)
        for r in range(len(blk.tgt)):
            grads = torch.autograd.grad(vals[r], leaves, retain_graph=True, allow_unused=True)
            gmap = {id(t): gr for t, gr in zip(leaves, grads)}
            for c, u in enumerate(blk.src.tolist()):
                t, i = node_handle(g, cap, src, u)
                gr = gmap[id(t)]
                gu = gr[i] if gr is not None else torch.zeros_like(t[i])
                want = float((gu * t[i].detach()).sum())
                assert abs(want - float(blk.W[r, c])) <= 1e-5 * max(1.0, abs(want)), (r, u)
    # central differences on the strongest edges into the target
    blk = g.blocks[-1]
    for c in blk.W[0].abs().argsort(descending=True)[:5].tolist():
        u = int(blk.src[c])
        vals = []
        for eps in (1e-2, -1e-2):
            src = clean_sources(cap, mode)
            t, i = node_handle(g, cap, src, u)
            t[i] = t[i] * (1 + eps)
            out = frozen_forward(sae, lm, cap, src, mode)
            vals.append(float(target_values(g, cap, out, blk.tgt)[0]))
        fd = (vals[0] - vals[1]) / 2e-2
        assert abs(fd - float(blk.W[0, c])) <= 2e-3 * max(1.0, abs(fd)), (u, fd)


def target_values_autograd(g, cap, out, nodes):
    vals = []
    for t in nodes.tolist():
        if int(g.kind[t]) == LOGIT:
            vals.append(out.logits[-1, TARGET.token] - out.logits[-1, TARGET.contrast])
            continue
        lc = cap.codes[int(g.layer[t])]
        row = int(lc.inc[: int(g.pos[t])].sum())
        slot = int(((lc.code.idx[row] == int(g.latent[t])) & (lc.code.acts[row] > 0))
                   .nonzero()[0, 0])
        vals.append(out.pre[int(g.layer[t])][row, slot])
    return vals


def test_frozen_mlp_incoming_edges_plus_bias_reproduce_each_value(sae, lm):
    """sum of incoming edges + bias = the target's value: the latent's activation as the SAE
    encodes the clean resid_post (mlsae's own capture), the logit difference as the LM
    computes it."""
    cap, g = build(sae, lm, (0, 1, 2, 3), "frozen-mlp")
    resid = lm.resid_post(IDS, [0, 1, 2, 3])[:, 0]
    logits = lm.logits(IDS)[0, -1]
    for blk in g.blocks:
        got = blk.W.double().sum(1) + g.bias[blk.tgt].double()
        for r, t in enumerate(blk.tgt.tolist()):
            if int(g.kind[t]) == LOGIT:
                want = float(logits[TARGET.token] - logits[TARGET.contrast])
            else:
                dense = sae.encode(resid[int(g.layer[t]), int(g.pos[t])]).dense(N)
                want = float(dense[int(g.latent[t])])
            assert abs(float(got[r]) - want) <= 1e-5 * max(1.0, abs(want)), (t, want)
    assert g.checks["additivity"]["max_rel_error"] < 1e-5
    assert g.checks["clean_logits_max_abs_diff"] < 1e-4


def test_influence_is_the_dense_neumann_series(sae, tiny_lm):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "frozen-mlp")
    everything = torch.arange(g.n_nodes)
    A = dense_adjacency(g, everything).abs()
    A = A / A.sum(1, keepdim=True).clamp_min(1e-10)
    B = torch.linalg.inv(torch.eye(g.n_nodes, dtype=torch.float64) - A) - torch.eye(
        g.n_nodes, dtype=torch.float64)
    w = torch.zeros(g.n_nodes, dtype=torch.float64)
    w[g.target_node] = 1.0
    assert torch.allclose(node_influence(g), w @ B, atol=1e-10, rtol=1e-8)


def circuit_tracer_prune(M, kind, node_threshold, edge_threshold, latents=None):
    """circuit_tracer.graph.prune_graph, transcribed for a dense matrix with node kinds;
    `latents`: node ids kept as the latents instead of the thresholded ones."""
    def norm(m):
        m = m.abs()
        return m / m.sum(1, keepdim=True).clamp(min=1e-10)

    def infl(A, w):
        cur = w @ A
        total = cur.clone()
        while cur.any():
            cur = cur @ A
            total += cur
        return total

    def thr(scores, t):
        s = torch.sort(scores, descending=True).values
        cum = torch.cumsum(s, 0) / s.sum()
        return s[min(int(torch.searchsorted(cum, t)), len(cum) - 1)]

    w = (kind == LOGIT).double()
    ni = infl(norm(M), w)
    node_mask = ni >= thr(ni, node_threshold)
    node_mask[(kind == LOGIT) | (kind == EMBEDDING)] = True
    if latents is not None:
        node_mask[kind == LATENT] = False
        node_mask[latents] = True
    P = M.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    NP = norm(P)
    pi = infl(NP, w) + w
    scores = NP * pi[:, None]
    edge_mask = scores >= thr(scores.flatten(), edge_threshold)
    src = ~((kind == LOGIT) | (kind == EMBEDDING))
    lat = kind == LATENT
    old = node_mask.clone()
    node_mask[src] &= edge_mask[:, src].any(0)
    node_mask[lat] &= edge_mask[lat].any(1)
    while not torch.all(node_mask == old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[src] &= edge_mask[:, src].any(0)
        node_mask[lat] &= edge_mask[lat].any(1)
    return node_mask, edge_mask


@pytest.mark.parametrize("thresholds,chosen", [((0.8, 0.98), False), ((0.5, 0.9), False),
                                               ((0.8, 0.98), True)])
def test_prune_matches_circuit_tracer(sae, tiny_lm, thresholds, chosen):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "jacobian")
    M = dense_adjacency(g, torch.arange(g.n_nodes))
    lat = (g.kind == LATENT).nonzero()[:, 0]
    # a chosen set mixing influential and random latents (as --select effect may)
    top = lat[torch.argsort(node_influence(g)[lat], descending=True)[:5]]
    rand = lat[torch.randperm(len(lat), generator=torch.Generator().manual_seed(2))[:4]]
    latents = torch.unique(torch.cat([top, rand])) if chosen else None
    node_mask, edge_mask = circuit_tracer_prune(M, g.kind, *thresholds, latents=latents)
    pr = prune(g, *thresholds, latents=latents)
    if chosen:
        kept = set(pr.nodes[g.kind[pr.nodes] == LATENT].tolist())
        assert kept and kept <= set(latents.tolist())
    # our node list also drops non-kept nodes with no edges left; circuit-tracer keeps
    # embeddings/logits always: compare the sets it keeps, then the edges
    assert set(pr.nodes.tolist()) == set(node_mask.nonzero()[:, 0].tolist())
    want = {(int(s), int(t)) for t, s in edge_mask.nonzero().tolist() if M[t, s] != 0}
    assert {(s, t) for s, t, _ in pr.edges} == want
    assert len(pr.nodes) < g.n_nodes


def test_causal_metrics_against_a_by_hand_splice(sae, tiny_lm, run_dir):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "jacobian")
    means, info = latent_means(sae, tiny_lm, [0, 1, 2, 3], tokens=192)
    assert info["tokens"] == 192 and means.shape == (4, N) and bool((means >= 0).all())
    direction = TARGET.direction(cap.logits.shape[-1])
    logits = tiny_lm.logits(IDS)[0, -1]
    clean = float(logits[TARGET.token] - logits[TARGET.contrast])
    assert abs(ablated_metric(sae, tiny_lm, cap, means, None, direction) - clean) < 1e-4
    # ablating the last layer's latent nodes only: nothing above re-encodes, so it is the
    # unembedding of decode(code with those latents at their means) + the clean error
    lat = (g.kind == LATENT).nonzero()[:, 0]
    last = lat[g.layer[lat] == 3]
    got = ablated_metric(sae, tiny_lm, cap, means, _ablate_masks(g, cap, last, N), direction)
    lc = cap.codes[3]
    x = cap.resid[3].clone()
    code = sae.encode(x[lc.inc])
    dense = code.dense(N)
    on = dense > 0
    dense[on] = means[3].expand_as(dense)[on]
    x[lc.inc] = sae.decode_dense(dense, code) + lc.err
    want_logits = tiny_lm.unembed(x)[-1].detach()
    want = float(want_logits[TARGET.token] - want_logits[TARGET.contrast])
    assert abs(got - want) < 1e-4
    pr = prune(g)
    circuit = pr.nodes[g.kind[pr.nodes] == LATENT]
    res = causal_checks(sae, tiny_lm, cap, g, means, circuit, pr.influence)
    assert abs(res["metric_full"] - clean) < 1e-4
    assert res["curve"][-1]["latents"] == len(lat)
    assert abs(res["curve"][-1]["faithfulness"] - 1.0) < 1e-4
    sizes = [p["latents"] for p in res["curve"]]
    assert sizes == sorted(sizes)
    # completeness of the circuit plus faithfulness of the rest are one measurement
    assert math.isfinite(res["faithfulness"]) and math.isfinite(res["completeness"])


def _by_hand_layer2_ablation(sae, tiny_lm, cap, g, means, reencode):
    """The metric with layer 2's latent nodes at their means, by hand: layer 2 rebuilt from
    its clean code, blocks 3 run by the LM (resid_from), layer 3 spliced by hand (its clean
    active set re-evaluated, or the SAE re-encoding), then the unembedding."""
    lc2, lc3 = cap.codes[2], cap.codes[3]
    dense = lc2.code.dense(N)
    on = dense > 0
    dense[on] = means[2].expand_as(dense)[on]
    x2 = cap.resid[2].clone()
    x2[lc2.inc] = sae.decode_dense(dense, lc2.code) + lc2.err
    x3 = tiny_lm.resid_from(IDS, 2, x2[None], 3)[0]
    if reencode:
        code = sae.encode(x3[lc3.inc])
    else:
        xt, mu, std = sae.preprocess(x3[lc3.inc])
        pre = ((xt - sae.b_dec) @ sae.W_enc + sae.b_enc).gather(-1, lc3.code.idx)
        code = type(lc3.code)(torch.where(lc3.code.acts > 0, pre.clamp_min(0), 0.0),
                              lc3.code.idx, mu, std)
    x3 = x3.clone()
    x3[lc3.inc] = sae.decode(code) + lc3.err
    out = tiny_lm.unembed(x3)[-1].detach()
    return float(out[TARGET.token] - out[TARGET.contrast])


@pytest.mark.parametrize("active_set", ["frozen", "re-encoded"])
def test_ablation_below_the_last_layer_by_hand(sae, tiny_lm, active_set):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "jacobian")
    means = torch.rand(4, N, generator=torch.Generator().manual_seed(1)) * 0.3
    lat = (g.kind == LATENT).nonzero()[:, 0]
    at2 = lat[g.layer[lat] == 2]
    direction = TARGET.direction(cap.logits.shape[-1])
    got = ablated_metric(sae, tiny_lm, cap, means, _ablate_masks(g, cap, at2, N), direction,
                         active_set)
    want = _by_hand_layer2_ablation(sae, tiny_lm, cap, g, means, active_set == "re-encoded")
    assert abs(got - want) < 1e-4
    other = _by_hand_layer2_ablation(sae, tiny_lm, cap, g, means, active_set == "frozen")
    assert abs(got - other) > 1e-4  # the two active-set rules are two computations


@pytest.mark.parametrize("model,active_set", [("real", "frozen"), ("real", "re-encoded"),
                                               ("linearised", "frozen")])
def test_batched_ablations_equal_single_ones(sae, tiny_lm, model, active_set):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "frozen-mlp")
    means = torch.rand(4, N, generator=torch.Generator().manual_seed(3)) * 0.3
    lat = (g.kind == LATENT).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(4)
    runs = [None] + [_ablate_masks(g, cap, lat[torch.rand(len(lat), generator=gen) < p], N)
                     for p in (0.1, 0.5, 0.9)] * 3  # 10 runs: two batches of causal.BATCH
    direction = TARGET.direction(cap.logits.shape[-1])
    got = ablated_metrics(sae, tiny_lm, cap, means, runs, direction, active_set, model,
                          "frozen-mlp")
    want = [ablated_metric(sae, tiny_lm, cap, means, r, direction, active_set, model,
                           "frozen-mlp") for r in runs]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(w, 4) for w in want)) > 2


def test_linearised_ablation_is_the_graph_in_frozen_mlp_mode(sae, tiny_lm):
    """In the linearised model of a frozen-mlp graph, moving latent u from a_u to its mean m_u
    moves the metric by (m_u - a_u) / a_u x the sum over paths of edge products."""
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "frozen-mlp")
    means = torch.rand(4, N, generator=torch.Generator().manual_seed(2)) * 0.3
    direction = TARGET.direction(cap.logits.shape[-1])
    clean = float(cap.logits[-1] @ direction)
    top = g.blocks[-1]  # edges into the target
    b3 = g.blocks[-2]  # edges into layer 3
    lat = (g.kind == LATENT).nonzero()[:, 0]
    for u in lat[g.layer[lat] == 2][:5].tolist():
        m = ablated_metric(sae, tiny_lm, cap, means, _ablate_masks(g, cap, torch.tensor([u]), N),
                           direction, model="linearised", mode="frozen-mlp")
        col = int((b3.src == u).nonzero()[0, 0])
        a3 = g.activation[b3.tgt]
        where = {int(n): c for c, n in enumerate(top.src)}
        w_t = top.W[0][[where[int(v)] for v in b3.tgt]]
        paths = float((b3.W[:, col] * w_t / a3).sum())
        a_u, m_u = float(g.activation[u]), float(means[2, int(g.latent[u])])
        assert abs((m - clean) - (m_u - a_u) / a_u * paths) < 1e-4 * max(1.0, abs(paths))


def test_exactness_check_in_frozen_mlp_mode(sae, tiny_lm):
    cap, g = build(sae, tiny_lm, (1, 3), "frozen-mlp")
    pr = prune(g)
    src = ((g.kind == LATENT) | (g.kind == ERROR) | (g.kind == MLP)).nonzero()[:, 0]
    top = src[torch.argsort(pr.influence[src], descending=True)][:6]
    res = exactness(sae, tiny_lm, cap, g, top, scale=3.0)
    assert res["edges_checked"] > 6 and res["max_rel_error"] < 1e-4
    # the same check fails on the jacobian graph (the MLPs are not linear)
    cap_j, g_j = build(sae, tiny_lm, (1, 3), "jacobian")
    g_j.mode = "frozen-mlp"  # measure the jacobian edges in the frozen-mlp forward
    lat = ((g_j.kind == LATENT) & (g_j.layer == 1)).nonzero()[:, 0][:6]
    bad = exactness(sae, tiny_lm, cap_j, g_j, lat, scale=3.0)
    assert bad["max_rel_error"] > 1e-3


def test_self_edge_shares_by_brute_force(sae, tiny_lm):
    cap, g = build(sae, tiny_lm, (0, 1, 2, 3), "jacobian")
    pr = prune(g)
    got = self_edges(g, pr)
    pairs = same = 0
    w_all = w_same = 0.0
    for blk in g.blocks:
        for r, t in enumerate(blk.tgt.tolist()):
            for c, s in enumerate(blk.src.tolist()):
                if int(g.kind[t]) == LATENT and int(g.kind[s]) == LATENT:
                    pairs += 1
                    w_all += abs(float(blk.W[r, c]))
                    if int(g.latent[t]) == int(g.latent[s]):
                        same += 1
                        w_same += abs(float(blk.W[r, c]))
    assert got["latent_pairs"] == pairs and got["self_pairs"] == same > 0
    assert abs(got["weight_share"] - w_same / w_all) < 1e-6
    assert 0 <= got["flow_share"] <= 1 and 0 <= got["pruned_share"] <= 1


NODE_KEYS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
             "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
             "influence", "activation"}


def test_cli_writes_circuit_tracer_json(run_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["graph", str(run_dir), "--prompt", "a=(b+1", "--target", ")", "--mode",
               "frozen-mlp", "--out", str(out), "--means-tokens", "96", "--device", "cpu"])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt",
            "node_threshold"} <= set(meta)
    assert meta["prompt_tokens"][1:] == list("a=(b+1")
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    for n in data["nodes"]:
        assert NODE_KEYS <= set(n) and set(n) - NODE_KEYS == {"mlsae"}
        if n["mlsae"]["kind"] == "latent":
            assert n["feature"] == n["mlsae"]["latent"] and n["node_id"].startswith(
                f"{n['layer']}_{n['feature']}_")
    m = meta["mlsae"]
    assert m["target"]["token_str"] == ")"
    assert [n for n in data["nodes"] if n["is_target_logit"]][0]["feature"] == m["target"][
        "token"]
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids and link["weight"] != 0
    assert m["mode"] == "frozen-mlp" and m["pruned_graph"]["nodes"] == len(ids)
    assert m["checks"]["additivity"]["max_rel_error"] < 1e-5
    assert m["checks"]["exactness"]["max_rel_error"] < 1e-4
    c = m["causal"]
    assert c["means"]["tokens"] == 96 and "faithfulness" in c and c["curve"]


def test_cli_prompts_file_writes_graphs_and_summary(run_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a=(b+1\n\nx=[1,2\t]\n")
    rc = main(["graph", str(run_dir), "--prompts", str(prompts), "--out",
               str(tmp_path / "gs"), "--means-tokens", "96", "--device", "cpu"])
    assert rc == 0
    summary = json.loads((tmp_path / "gs" / "summary.json").read_text())
    assert len(summary["prompts"]) == 2 and summary["self_edges"]["prompts"] == 2
    assert summary["prompts"][1]["target"]["token_str"] == "]"
    index = json.loads((tmp_path / "gs" / "graph-metadata.json").read_text())
    assert len(index["graphs"]) == 2
    for row in summary["prompts"]:
        assert (tmp_path / "gs" / f"{row['slug']}.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x" * 60], "the context is 48 tokens"),
    (["--prompt", "a=(b", "--target", "ab"], "is 2 tokens, not one"),
    (["--prompt", "a=(b", "--layers", "2,7"], "the run has no layer 7"),
    (["--prompt", "a=(b", "--metric", "logit-diff", "--target", ")"], "needs --target and "
     "--contrast"),
    (["--prompt", "a=(b", "--mode", "exact"], "--mode 'exact': choose one of"),
    ([], "give --prompt TEXT or --prompts FILE"),
])
def test_cli_bad_input_is_one_line_exit_2(run_dir, capsys, args, message):
    rc = main(["graph", str(run_dir), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
