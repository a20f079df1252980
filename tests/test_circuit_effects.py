"""Latent effects by integrated gradients (mlsae.circuits.effects) on a tiny random Llama,
against a by-hand re-statement of the path (dense encoder, the LM's own blocks between
spliced layers): the path's metric, each node's gradient by central differences, the
effects' sum against m(clean) - m(every latent ablated) from the causal checks' own code,
and `--select effect` through the CLI (the pruned graph keeps only the top latents, each with
its effect)."""

from __future__ import annotations

import json

import pytest
import torch
from test_circuits import IDS, TARGET, N, build, make_sae

from mlsae.circuits.attribution import LATENT, attribute
from mlsae.circuits.causal import _ablate_masks, ablated_metric, causal_checks
from mlsae.circuits.command import GraphConfig, GraphSession, make_target, tokenize
from mlsae.circuits.effects import integrated_effects, latent_slots, path_point
from mlsae.circuits.graphio import node_id
from mlsae.circuits.influence import prune
from mlsae.circuits.linear import capture
from mlsae.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYERS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def sae(tiny_model_dir, text_file):
    return make_sae(tiny_model_dir, text_file)


@pytest.fixture(scope="module")
def means():
    return torch.rand(len(LAYERS), N, generator=torch.Generator().manual_seed(5)) * 0.3


def by_hand(sae, lm, cap, means, alpha, bump=None, arrivals=None):
    """The path's metric at `alpha`, by hand: at each spliced layer the dense pre-activations
    of what arrives, each clean-active latent at mean + alpha (relu(pre) - mean) (plus
    `bump = (layer, row, latent, eps)`), decoded densely with the clean error; the LM's own
    blocks in between. `arrivals`: a dict to fill with each layer's dense relu(pre)."""
    x = cap.resid[LAYERS[0]].clone()
    for i, v in enumerate(LAYERS):
        lc = cap.codes[v]
        xt, mu, std = sae.preprocess(x[lc.inc])
        pre = (xt - sae.b_dec) @ sae.W_enc + sae.b_enc  # [n_inc, n_latents]
        if arrivals is not None:
            arrivals[v] = pre.clamp_min(0).detach()
        on = lc.code.dense(N) > 0
        val = torch.where(on, means[i] + alpha * (pre.clamp_min(0) - means[i]), 0.0)
        if bump is not None and bump[0] == v:
            val[bump[1], bump[2]] += bump[3]
        x = x.clone()
        x[lc.inc] = (val @ sae.W_dec + sae.b_dec) * (std + sae.eps) + mu + lc.err
        if i + 1 < len(LAYERS):
            x = lm.resid_from(IDS, v, x[None], LAYERS[i + 1])[0]
    out = lm.unembed(x)[-1].detach()
    return float(out[TARGET.token] - out[TARGET.contrast])


def test_path_metric_and_gradients_against_a_by_hand_path(sae, tiny_lm, means):
    cap, g = build(sae, tiny_lm, LAYERS, "jacobian")
    direction = TARGET.direction(cap.logits.shape[-1])
    for alpha in (0.0, 1.0, 0.3):
        m, part = path_point(sae, tiny_lm, cap, means, direction, alpha)
        assert abs(m - by_hand(sae, tiny_lm, cap, means, alpha)) < 1e-4
    # at alpha 0.3, each node's d(metric)/d(value) by central differences times its rate
    # (relu(pre) - mean of what arrives on the path)
    arrive = {}
    by_hand(sae, tiny_lm, cap, means, 0.3, arrivals=arrive)
    lat = (g.kind == LATENT).nonzero()[:, 0]
    checked = 0
    for i, v in enumerate(LAYERS):
        at = lat[g.layer[lat] == v]
        rows, slots = latent_slots(g, cap, at)
        top = part[v][rows, slots].abs().argsort(descending=True)[:4]  # the largest ones
        at, rows, slots = at[top], rows[top], slots[top]
        for node, r, s in zip(at.tolist(), rows.tolist(), slots.tolist()):
            latent, eps = int(g.latent[node]), 5e-2
            up = by_hand(sae, tiny_lm, cap, means, 0.3, (v, r, latent, eps))
            down = by_hand(sae, tiny_lm, cap, means, 0.3, (v, r, latent, -eps))
            want = (up - down) / (2 * eps) * float(arrive[v][r, latent] - means[i, latent])
            assert float(part[v][r, s]) == pytest.approx(want, rel=3e-2, abs=3e-6)
            checked += abs(want) > 3e-5
    assert checked >= 8


def test_effects_sum_to_the_ablation_difference(sae, tiny_lm, means):
    cap, g = build(sae, tiny_lm, LAYERS, "jacobian")
    direction = TARGET.direction(cap.logits.shape[-1])
    lat = (g.kind == LATENT).nonzero()[:, 0]
    m_clean = float(cap.logits[-1] @ direction)
    m_empty = ablated_metric(sae, tiny_lm, cap, means, _ablate_masks(g, cap, lat, N), direction)
    assert abs(m_empty - by_hand(sae, tiny_lm, cap, means, 0.0)) < 1e-4
    errors = []
    for steps in (1, 4, 32):
        eff, info = integrated_effects(sae, tiny_lm, cap, g, means, steps)
        assert info["steps"] == steps and abs(info["sum"] - float(eff.sum())) < 1e-9
        assert bool((eff[g.kind != LATENT] == 0).all()) and bool((eff[lat] != 0).any())
        errors.append(abs(float(eff.sum()) - (m_clean - m_empty)))
    assert errors[-1] < 0.01 * abs(m_clean - m_empty)
    assert errors[-1] < errors[0]
    # the checks record the sum over m(M) - m(empty) and a curve by |effect|
    pr = prune(g)
    res = causal_checks(sae, tiny_lm, cap, g, means, pr.nodes[g.kind[pr.nodes] == LATENT],
                        pr.influence, effects=eff)
    assert res["effect_sum_ratio"] == pytest.approx(float(eff.sum()) / (m_clean - m_empty),
                                                    rel=1e-5)
    assert res["effect_curve"][-1]["latents"] == len(lat)
    assert res["effect_curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    order = lat[torch.argsort(eff[lat].abs(), descending=True)]
    n = res["effect_curve"][0]["latents"]
    keep = torch.zeros(g.n_nodes, dtype=torch.bool)
    keep[order[:n]] = True
    m = ablated_metric(sae, tiny_lm, cap, means,
                       _ablate_masks(g, cap, lat[~keep[lat]], N), direction)
    assert res["effect_curve"][0]["metric"] == pytest.approx(m, abs=1e-4)


def test_cli_select_effect(tiny_model_dir, text_file, tmp_path, capsys):
    run = make_sae(tiny_model_dir, text_file).save_pretrained(tmp_path / "run")
    out = tmp_path / "g.json"
    assert main(["graph", str(run), "--prompt", "a=(b+1", "--metric", "logit-diff",
                 "--target", ")", "--contrast", "]", "--select", "effect", "--max-latents",
                 "5", "--effect-steps", "3", "--means-tokens", "96", "--out", str(out),
                 "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    lat = [n for n in data["nodes"] if n["mlsae"]["kind"] == "latent"]
    assert 0 < len(lat) <= 5
    # the kept latents are among the 5 of largest |effect| over the WHOLE graph, each with
    # its effect, recomputed here on the same means
    session = GraphSession(run, GraphConfig(metric="logit-diff", means_tokens=96,
                                            device="cpu"))
    cap = capture(session.sae, session.lm, tokenize(session.lm, "a=(b+1", session.limit),
                  session.layers, session.data_cfg)
    g = attribute(session.sae, session.lm, cap, make_target(
        session.lm, cap.logits[-1], session.cfg, ")", "]"), "jacobian")
    eff, _ = integrated_effects(session.sae, session.lm, cap, g, session.means()[0], 3)
    all_lat = (g.kind == LATENT).nonzero()[:, 0]
    top = all_lat[torch.argsort(eff[all_lat].abs(), descending=True)[:5]]
    want = {node_id(g, int(i)): float(eff[i]) for i in top}
    assert len(all_lat) > 5
    assert {n["node_id"] for n in lat} <= set(want)
    for n in lat:
        assert n["mlsae"]["effect"] == pytest.approx(want[n["node_id"]], rel=1e-4, abs=1e-7)
    causal = data["metadata"]["mlsae"]["causal"]
    assert causal["select"] == "effect" and causal["effects"]["steps"] == 3
    assert all(n["mlsae"]["effect"] is not None for n in lat)
    assert all(n["mlsae"]["effect"] is None for n in data["nodes"]
               if n["mlsae"]["kind"] != "latent")
    assert "effect_curve" in causal and math_ok(causal["effect_sum_ratio"])
    assert main(["graph", str(run), "--prompt", "a=(b+1", "--select", "effect",
                 "--effect-steps", "0", "--out", str(out)]) == 2
    assert "--select effect needs --effect-steps >= 1" in capsys.readouterr().err


def math_ok(x) -> bool:
    return x == x and abs(x) < float("inf")


def test_per_node_alpha_is_the_mean_ablation_of_the_others(sae, tiny_lm, means):
    cap, g = build(sae, tiny_lm, LAYERS, "jacobian")
    direction = TARGET.direction(cap.logits.shape[-1])
    lat = (g.kind == LATENT).nonzero()[:, 0]
    keep = lat[torch.rand(len(lat), generator=torch.Generator().manual_seed(6)) < 0.4]
    alpha = {v: torch.zeros(cap.codes[v].code.idx.shape) for v in LAYERS}
    for v in LAYERS:
        at = keep[g.layer[keep] == v]
        if len(at):
            rows, slots = latent_slots(g, cap, at)
            alpha[v][rows, slots] = 1.0
    m, _ = path_point(sae, tiny_lm, cap, means, direction, alpha)
    inside = torch.zeros(g.n_nodes, dtype=torch.bool)
    inside[keep] = True
    want = ablated_metric(sae, tiny_lm, cap, means, _ablate_masks(g, cap, lat[~inside[lat]], N),
                          direction)
    assert 0 < len(keep) < len(lat)
    assert m == pytest.approx(want, abs=1e-4)
