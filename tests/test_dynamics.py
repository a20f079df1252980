"""mlsae.analysis.dynamics (persistence, contiguity, entry / exit, lifespan) against an explicit
loop over (token, latent) pairs and layer positions on dense TopK-style activations."""

import math

import numpy as np
import pytest
import torch

from mlsae.analysis.dynamics import LayerDynamics


def dense_acts(n_layers: int, shape_tok: tuple[int, ...], n: int, k: int, seed: int,
               zero_frac: float = 0.2) -> np.ndarray:
    """[layer, *tok, n]: the k largest per vector kept and ReLU'd, plus some selected-but-zero
    entries; latents prefer a layer so active sets have gaps, runs and single layers."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(n_layers, *shape_tok, n))
    pref = g.integers(0, n_layers, n)
    layer = np.arange(n_layers).reshape(-1, *([1] * len(shape_tok)), 1)
    z = z - 0.5 * np.abs(layer - pref) + 0.4
    thr = np.sort(z, axis=-1)[..., -k][..., None]
    a = np.where(z >= thr, np.maximum(z, 0), 0.0)
    return np.where(g.random(a.shape) < zero_frac, 0.0, a)


def to_sparse(a: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = torch.from_numpy(a).float().topk(k, dim=-1)
    return i, v


def brute_force(a: np.ndarray) -> tuple[dict, dict]:
    """Pooled numbers and per-latent lists from loops; a [L, T, n] dense."""
    n_layers, n_tok, n = a.shape
    num = den = pairs = contig = 0
    entries, exits, spans = [], [], []
    per = {f: {"pairs": 0, "entry": 0, "exit": 0, "num": 0, "den": 0, "contig": 0}
           for f in range(n)}
    for t in range(n_tok):
        for f in range(n):
            s = [i for i in range(n_layers) if a[i, t, f] > 0]
            if not s:
                continue
            pairs += 1
            entries.append(min(s))
            exits.append(max(s))
            spans.append(max(s) - min(s) + 1)
            is_contig = all(i in s for i in range(min(s), max(s) + 1))
            contig += is_contig
            p = per[f]
            p["pairs"] += 1
            p["entry"] += min(s)
            p["exit"] += max(s)
            p["contig"] += is_contig
            for i in s:
                if i + 1 < n_layers:
                    den += 1
                    p["den"] += 1
                    if i + 1 in s:
                        num += 1
                        p["num"] += 1
    pooled = {"persistence": num / den if den else math.nan,
              "frac_pairs_contiguous": contig / pairs,
              "mean_entry_layer": np.mean(entries), "mean_exit_layer": np.mean(exits),
              "mean_lifespan": np.mean(spans), "active_pairs": pairs,
              "entry_layer_hist": np.bincount(entries, minlength=n_layers).tolist(),
              "exit_layer_hist": np.bincount(exits, minlength=n_layers).tolist(),
              "lifespan_hist": np.bincount(spans, minlength=n_layers + 1).tolist()}
    return pooled, per


@pytest.mark.parametrize("n_layers,seed", [(2, 0), (6, 1), (9, 2)])
def test_dynamics_vs_brute_force_and_streaming(n_layers, seed):
    n, k = 20, 4
    a = dense_acts(n_layers, (3, 12), n, k, seed)
    mask = np.ones((3, 12), bool)
    mask[:, 0] = False
    mask[1, 5] = False
    idx, acts = to_sparse(a, k)
    dyn = LayerDynamics(n_layers, n)
    dyn.update(idx, acts, torch.from_numpy(mask))
    streamed = LayerDynamics(n_layers, n)
    for b in range(3):
        streamed.update(idx[:, b], acts[:, b], torch.from_numpy(mask[b]))

    pooled, per = brute_force(a[:, mask])
    if n_layers > 2:  # the data has gaps and runs (two layers cannot have a gap)
        assert 0 < pooled["frac_pairs_contiguous"] < 1
    for got in (dyn.compute(), streamed.compute()):
        for key, want in pooled.items():
            if isinstance(want, list):
                assert got[key] == want, key
            else:
                assert got[key] == pytest.approx(want, rel=1e-12), key
    assert dyn.n_tokens == mask.sum()

    pl = dyn.per_latent()
    for f in range(n):
        p = per[f]
        assert pl["n_pairs"][f].item() == p["pairs"]
        if p["pairs"] == 0:
            assert math.isnan(pl["entry_layer"][f]) and math.isnan(pl["persistence"][f])
            continue
        assert pl["entry_layer"][f].item() == pytest.approx(p["entry"] / p["pairs"])
        assert pl["exit_layer"][f].item() == pytest.approx(p["exit"] / p["pairs"])
        assert pl["lifespan"][f].item() == pytest.approx((p["exit"] - p["entry"]) / p["pairs"] + 1)
        assert pl["frac_contiguous"][f].item() == pytest.approx(p["contig"] / p["pairs"])
        if p["den"]:
            assert pl["persistence"][f].item() == pytest.approx(p["num"] / p["den"])
        else:
            assert math.isnan(pl["persistence"][f])


def test_dynamics_hand_cases():
    # L = 5, one token, latents: 0 at {1,2,3} (contiguous), 1 at {0,2} (gap), 2 at {4} only
    n_layers = 5
    a = np.zeros((n_layers, 1, 3))
    a[[1, 2, 3], 0, 0] = 1.0
    a[[0, 2], 0, 1] = 0.5
    a[4, 0, 2] = 2.0
    dyn = LayerDynamics(n_layers, 3)
    dyn.update(*to_sparse(a, 3))
    out = dyn.compute()
    # continuations: latent 0: 1->2 yes, 2->3 yes, 3->4 no; latent 1: 0->1 no, 2->3 no;
    # latent 2: layer 4 is last (no next layer): 2 / 5
    assert out["persistence"] == pytest.approx(2 / 5)
    assert out["frac_pairs_contiguous"] == pytest.approx(2 / 3)
    assert out["lifespan_hist"] == [0, 1, 0, 2, 0, 0]
    assert out["entry_layer_hist"] == [1, 1, 0, 0, 1]
    pl = dyn.per_latent()
    assert pl["persistence"].tolist()[:2] == [pytest.approx(2 / 3), 0.0]
    assert math.isnan(pl["persistence"][2])  # active only at the last layer
    assert pl["lifespan"].tolist() == [3.0, 3.0, 1.0]
    # nothing active, and one layer: NaN persistence, no crash
    empty = LayerDynamics(1, 3)
    empty.update(*to_sparse(np.zeros((1, 4, 3)), 2))
    assert math.isnan(empty.compute()["persistence"]) and empty.compute()["active_pairs"] == 0
