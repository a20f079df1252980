"""mlsae.analysis statistics against brute-force numpy on small dense synthetic activations."""

import math

import numpy as np
import pytest
import torch

from mlsae.analysis.layer_dist import (
    LayerDistribution,
    aggregated_layer_var,
    heatmap_latents,
    layer_entropy,
    layer_moments,
    layer_probs,
    n_active_layers,
    prompt_distribution,
    std_histogram,
)
from mlsae.analysis.mmcs import max_cosine_within, mmcs_between, mmcs_within
from mlsae.analysis.resid_sim import ResidSimilarity
from mlsae.analysis.token_variance import PerTokenLayerVariance
from mlsae.analysis.top_examples import (
    TopExamples,
    example_locations,
    query_examples,
    update_contexts,
)

L, N_LAT, K = 5, 24, 4


def dense_acts(shape_tok: tuple[int, ...], seed: int = 0, n_layers: int = L) -> np.ndarray:
    """Dense TopK-style activations [layer, *tok, n]: k largest per vector, ReLU'd (some are 0).

    Latents have a preferred layer so distributions are not all uniform."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(n_layers, *shape_tok, N_LAT))
    pref = g.integers(0, n_layers, N_LAT)
    layer = np.arange(n_layers).reshape(-1, *([1] * len(shape_tok)), 1)
    z = z - 0.6 * np.abs(layer - pref) + 0.3
    thr = np.sort(z, axis=-1)[..., -K][..., None]
    return np.where(z >= thr, np.maximum(z, 0), 0.0)


def to_sparse(acts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = torch.from_numpy(acts).float().topk(K, dim=-1)
    return i, v


def ref_var(p: np.ndarray) -> np.ndarray:
    """Var over axis 0 of distributions p [L, ...]: sum_l p (l - mean)^2."""
    pos = np.arange(p.shape[0]).reshape(-1, *([1] * (p.ndim - 1)))
    m = (p * pos).sum(0)
    return (p * (pos - m) ** 2).sum(0)


def ref_per_token(a: np.ndarray) -> np.ndarray:
    """Per active (t, f) Var(q_tf) for a [L, T, n]."""
    s = a.sum(0)
    act = s > 0
    q = np.where(act, a / np.where(act, s, 1), 0)
    return ref_var(q)[act]


def seed_metric(a: np.ndarray) -> tuple[float, float]:
    """Literal port of the seed code's Metric.update: (exp_var_l_tf, exp_var_l_f)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.nan_to_num(a / a.sum(0))

    def var(x):
        pos = np.arange(L).reshape(-1, *([1] * (x.ndim - 1)))
        return (pos**2 * x).sum(0) - ((pos * x).sum(0)) ** 2

    return var(probs).mean(), var(probs.mean(1)).mean()


def test_layer_distribution_vs_numpy_and_streaming():
    a = dense_acts((3, 10), seed=1)  # [L, batch, seq, n]
    mask = np.ones((3, 10), bool)
    mask[:, 0] = False  # exclude position 0
    idx, acts = to_sparse(a)
    one = LayerDistribution(L, N_LAT)
    one.update(idx, acts, mask=torch.from_numpy(mask))
    am = a[:, mask]  # [L, T, n]
    np.testing.assert_array_equal(one.counts.numpy(), (am > 0).sum(1))
    np.testing.assert_allclose(one.totals.numpy(), am.sum(1), rtol=1e-6)
    assert one.n_tokens == mask.sum()

    streamed = LayerDistribution(L, N_LAT)
    for b in range(3):  # one batch row at a time == all at once
        streamed.update(idx[:, b], acts[:, b], mask=torch.from_numpy(mask[b]))
    torch.testing.assert_close(streamed.counts, one.counts)
    torch.testing.assert_close(streamed.totals, one.totals)

    tot = am.sum(1)
    alive = tot.sum(0) > 0
    p = tot[:, alive] / tot[:, alive].sum(0)
    pos = np.arange(L)[:, None]
    st = one.per_latent()
    np.testing.assert_allclose(st["layer_mean"].numpy()[alive], (p * pos).sum(0), rtol=1e-5)
    np.testing.assert_allclose(st["layer_var"].numpy()[alive], ref_var(p), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(st["layer_std"].numpy()[alive], np.sqrt(ref_var(p)), atol=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0).sum(0) / np.log(L)
    np.testing.assert_allclose(st["entropy"].numpy()[alive], h, rtol=1e-5, atol=1e-9)
    assert np.isnan(st["layer_var"].numpy()[~alive]).all()
    assert one.aggregated_layer_var() == pytest.approx(ref_var(p).mean(), rel=1e-6)
    # number of active layers vs a loop, default threshold and a custom one
    cnt = (am > 0).sum(1)
    for min_count, min_frac in [(1, 0.01), (2, 0.2), (1, 0.0)]:
        want = [
            sum(cnt[i, f] >= max(min_count, min_frac * cnt[:, f].sum()) for i in range(L))
            for f in range(N_LAT)
        ]
        got = n_active_layers(one.counts, min_count, min_frac)
        np.testing.assert_array_equal(got.numpy(), want)
    rt = LayerDistribution.from_state_dict(one.state_dict())
    torch.testing.assert_close(rt.totals, one.totals)


@pytest.mark.parametrize("n_layers", [1, 2, 5, 12])
def test_single_layer_and_uniform(n_layers):
    totals = torch.zeros(n_layers, 3, dtype=torch.float64)
    totals[n_layers - 1, 0] = 4.0  # one layer only
    totals[:, 1] = 2.5  # uniform
    p = layer_probs(totals)
    mean, var = layer_moments(p)
    assert var[0].item() == 0.0 and mean[0].item() == n_layers - 1
    assert var[1].item() == pytest.approx((n_layers**2 - 1) / 12)
    assert torch.isnan(var[2])  # never fired
    ent = layer_entropy(p)
    assert ent[0].item() == 0.0
    assert ent[1].item() == pytest.approx(1.0 if n_layers > 1 else 0.0)
    assert aggregated_layer_var(totals) == pytest.approx(((n_layers**2 - 1) / 12) / 2)


def test_per_token_variance_vs_numpy_streaming_and_seed():
    a = dense_acts((60,), seed=2)  # [L, T, n]
    idx, acts = to_sparse(a)
    ref = ref_per_token(a)
    one = PerTokenLayerVariance(L, N_LAT, n_bins=20)
    one.update(idx, acts)
    r = one.compute()
    assert r["n_pairs"] == ref.size
    assert r["per_token_var"] == pytest.approx(ref.mean(), rel=1e-6)
    assert r["per_token_std_mean"] == pytest.approx(np.sqrt(ref).mean(), rel=1e-6)
    n_lay = (a > 0).sum(0)[a.sum(0) > 0]
    assert r["frac_single_layer"] == pytest.approx((n_lay == 1).mean())
    np.testing.assert_array_equal(r["n_layers_hist"].numpy(), np.bincount(n_lay, minlength=L + 1))
    hist, _ = np.histogram(np.sqrt(ref), bins=r["std_edges"].numpy())
    np.testing.assert_array_equal(r["std_hist"].numpy(), hist)
    assert r["std_hist"].sum().item() == ref.size

    # streaming in unequal batches: per-pair stats identical; seed variant = mean of batch values
    cuts = [0, 7, 30, 60]
    st = PerTokenLayerVariance(L, N_LAT, n_bins=20)
    seeds = []
    for s, e in zip(cuts[:-1], cuts[1:]):
        st.update(idx[:, s:e], acts[:, s:e])
        seeds.append(seed_metric(a[:, s:e]))
    rs = st.compute()
    for key in ("per_token_var", "n_pairs", "frac_single_layer", "seed_var_tf_global"):
        assert rs[key] == pytest.approx(r[key], rel=1e-9)
    assert rs["seed_var_f_global"] == pytest.approx(r["seed_var_f_global"], rel=1e-9)
    torch.testing.assert_close(rs["std_hist"], r["std_hist"])
    tf, f = np.array(seeds).T
    assert rs["seed_var_tf"] == pytest.approx(tf.mean(), rel=1e-5)
    assert rs["seed_var_f"] == pytest.approx(f.mean(), rel=1e-5)
    assert rs["seed_ratio"] == pytest.approx((tf / f).mean(), rel=1e-5)
    tf1, f1 = seed_metric(a)
    assert r["seed_var_tf_global"] == pytest.approx(tf1, rel=1e-5)
    assert r["seed_var_f_global"] == pytest.approx(f1, rel=1e-5)


def test_per_token_single_layer_and_mask():
    # every latent fires at one layer per token -> per-token variance exactly 0
    idx = torch.tensor([[[0, 1]], [[2, 3]]])  # [L=2, T=1, k=2], disjoint latents per layer
    acts = torch.tensor([[[1.0, 0.5]], [[2.0, 0.0]]])
    pt = PerTokenLayerVariance(2, 4, n_bins=4)
    pt.update(idx, acts)
    r = pt.compute()
    assert r["per_token_var"] == 0.0 and r["n_pairs"] == 3 and r["frac_single_layer"] == 1.0
    # same latent at both layers with equal weight -> Var = 1/4
    pt = PerTokenLayerVariance(2, 4)
    pt.update(torch.tensor([[[1, 0]], [[1, 2]]]), torch.tensor([[[3.0, 0]], [[3.0, 0]]]))
    assert pt.compute()["per_token_var"] == pytest.approx(0.25)
    # masked tokens are ignored
    a = dense_acts((2, 6), seed=3)
    mask = np.zeros((2, 6), bool)
    mask[:, 2:] = True
    pt = PerTokenLayerVariance(L, N_LAT)
    pt.update(*to_sparse(a), mask=torch.from_numpy(mask))
    assert pt.compute()["per_token_var"] == pytest.approx(ref_per_token(a[:, mask]).mean())


def test_std_histogram_edges():
    counts, edges = std_histogram(torch.tensor([0.0, 0.49, 0.5, 2.0, math.nan]), 5, n_bins=4)
    assert edges.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert counts.tolist() == [2, 1, 0, 1]


def test_prompt_distribution_and_heatmap():
    a = dense_acts((1, 9), seed=4)
    idx, acts = to_sparse(a)
    tot = prompt_distribution(idx, acts, N_LAT)
    np.testing.assert_allclose(tot.numpy(), a.sum((1, 2)), rtol=1e-6)
    ids, p = heatmap_latents(tot, n_top=6)
    want = np.argsort(-a.sum((0, 1, 2)))[:6]
    assert set(ids.tolist()) == set(want.tolist())
    np.testing.assert_allclose(p.sum(0).numpy(), 1.0)
    means = layer_moments(p)[0]
    assert torch.all(means[1:] >= means[:-1])
    ids_all, _ = heatmap_latents(tot, n_top=10_000)
    assert len(ids_all) == int((a.sum((0, 1, 2)) > 0).sum())


def test_resid_similarity_vs_numpy():
    g = np.random.default_rng(5)
    x = g.normal(size=(4, 2, 15, 8)) + g.normal(size=(4, 1, 1, 8))  # [layer, batch, seq, d]
    x[1:] += 0.8 * x[:-1]  # correlated adjacent layers
    sim = ResidSimilarity(4, 8)
    xt = torch.from_numpy(x).float()
    for b in range(2):
        sim.update_mean(xt[:, b])
    sim.finalize_means()
    with pytest.raises(RuntimeError):
        sim.compute()
    for b in range(2):
        sim.update(xt[:, b])
    cos, mean = sim.compute()
    xf = x.reshape(4, -1, 8)
    u = xf - xf.mean(1, keepdims=True)
    un = u / np.linalg.norm(u, axis=-1, keepdims=True)
    want = [np.mean((un[i] * un[i + 1]).sum(-1)) for i in range(3)]
    np.testing.assert_allclose(cos.numpy(), want, rtol=1e-5)
    assert mean == pytest.approx(np.mean(want), rel=1e-5)
    half = ResidSimilarity(4, 8)
    half.update_mean(xt)
    half.finalize_means()
    half.update(xt[:, :1])
    with pytest.raises(RuntimeError):
        half.compute()  # pass 2 must see the same tokens


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_mmcs_vs_brute_force(chunk):
    g = np.random.default_rng(6)
    w, b = g.normal(size=(37, 6)), g.normal(size=(23, 6)) * 3
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = wn @ wn.T
    np.fill_diagonal(s, -np.inf)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    np.testing.assert_allclose(max_cosine_within(wt, chunk).numpy(), s.max(1), atol=1e-6)
    assert mmcs_within(wt, chunk) == pytest.approx(s.max(1).mean(), abs=1e-6)
    assert mmcs_between(wt, bt, chunk) == pytest.approx((wn @ bn.T).max(1).mean(), abs=1e-6)
    assert mmcs_within(torch.cat([wt, wt[:1]]), chunk) == pytest.approx(
        np.append(np.where(np.arange(37) == 0, 1.0, s.max(1)), 1.0).mean(), abs=1e-6
    )  # an exact duplicate row has MMCS 1 with its twin


def test_top_examples_vs_full_sort(tmp_path):
    n_top, n_seq = 3, 8
    a = dense_acts((10, n_seq), seed=7)  # [L, batch, seq, n]: 10 sequences
    mask = np.ones((10, n_seq), bool)
    mask[:, 0] = False
    idx, acts = to_sparse(a)
    tops = TopExamples(N_LAT, L, n_top=n_top)
    for s, e in [(0, 4), (4, 5), (5, 10)]:  # stream, with a global sequence offset
        tops.update(idx[:, s:e], acts[:, s:e], seq_offset=s, mask=torch.from_numpy(mask[s:e]))
    am = np.where(mask[None, :, :, None], a, 0)
    for f in range(N_LAT):
        for lay in range(L):
            sq, ps = np.nonzero(am[lay, :, :, f] > 0)
            vals = am[lay, sq, ps, f]
            o = np.argsort(-vals)[:n_top]
            got = tops.get(f, lay)
            assert [(g[1], g[2]) for g in got] == list(zip(sq[o].tolist(), ps[o].tolist()))
            np.testing.assert_allclose([g[0] for g in got], vals[o], rtol=1e-6)

    # explicit seq ids give the same positions, relabelled
    t2 = TopExamples(N_LAT, L, n_top=n_top)
    t2.update(idx, acts, seq_ids=torch.arange(10) + 100, mask=torch.from_numpy(mask))
    assert [(v, s + 100, p) for v, s, p in tops.get(3, 2)] == t2.get(3, 2)

    db = tmp_path / "ex.sqlite"
    layer_ids = [10, 11, 12, 13, 14]
    n_rows = tops.to_sqlite(db, layer_ids=layer_ids, chunk=10)
    assert n_rows == int((tops.values > 0).sum())
    rows = query_examples(db, 3, 12)
    assert [(r["activation"], r["seq"], r["pos"]) for r in rows] == [
        (pytest.approx(v), s, p) for v, s, p in tops.get(3, 2)
    ]
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    assert rows[0]["context_tokens"] is None
    locs = example_locations(db)
    assert len(locs) == n_rows and locs == sorted(locs, key=lambda r: (r[3], r[4]))
    update_contexts(db, [(3, 12, 0, [5, 6, 7], [0.0, 1.5, 0.25], 4)])
    r0 = query_examples(db, 3, 12)[0]
    assert r0["context_tokens"] == [5, 6, 7] and r0["context_acts"] == [0.0, 1.5, 0.25]
    assert r0["context_start"] == 4
    assert tops.to_sqlite(db) == n_rows  # rewriting replaces the table
    assert query_examples(db, 3, 12) == []  # layers now stored as positions
