"""`mlsae features`: logit effect and activation density per layer, against independent
computations on a tiny run; the explorer's latent view and the report show them."""

import json

import numpy as np
import pytest
import torch

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.analysis.features import (
    DENSITY_BINS,
    LOG_HI,
    LOG_LO,
    features,
    logit_effects,
    read_latent,
)
from mlsae.data import include_mask
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train


@pytest.fixture(scope="module")
def run(tiny_lm, tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "run"
    train(RunConfig(SAEConfig(expansion_factor=2, k=4),
                    DataConfig(dataset=str(text_file), ctx_len=32),
                    TrainConfig(model=str(tiny_model_dir), layers="0,2", tokens=4 * 32 * 4,
                                batch_size=4, eval_tokens=0, dead_tokens=100, out=str(out))),
          lm=tiny_lm, progress=False)
    return out


OPTS = TextOptions(tokens=256, batch_size=4)


def test_density_matches_a_direct_histogram(run, tiny_lm):
    res = features(run, OPTS, lm=tiny_lm, progress=False)
    assert res["layers"] == [0, 2]
    sae = MLSAE.from_pretrained(run)
    data_cfg, batches, _ = eval_batches(sae, tiny_lm, OPTS)
    acts = {0: [], 2: []}
    for ids in batches:
        mask = include_mask(ids, tiny_lm.special_ids, data_cfg)
        resid = tiny_lm.resid_post(ids, [0, 2])
        for i, layer in enumerate([0, 2]):
            with torch.no_grad():
                dense = sae.encode(resid[i][mask].float()).dense(sae.n_latents)
            acts[layer].append(dense)
    edges = np.logspace(LOG_LO, LOG_HI, DENSITY_BINS + 1)
    checked = 0
    for latent in range(sae.n_latents):
        got = read_latent(run, latent)
        for i, layer in enumerate([0, 2]):
            a = torch.cat(acts[layer])[:, latent].double().numpy()
            a = np.clip(a[a > 0], edges[0], edges[-1] * 0.999999)
            want, _ = np.histogram(a, bins=edges)
            assert got["density"][i] == want.tolist(), (latent, layer)
            checked += int(want.sum())
    assert checked > 0 and got["layers"] == [0, 2]


def test_logit_effect_by_hand(run, tiny_lm):
    sae = MLSAE.from_pretrained(run)
    W = sae.W_dec.detach()[:5]
    top_v, top_i, bot_v, bot_i = logit_effects(tiny_lm, W, top=6)
    model = tiny_lm.model  # Llama: RMSNorm, then lm_head
    gamma, eps = model.model.norm.weight, model.model.norm.variance_epsilon
    normed = gamma * W / torch.sqrt(W.pow(2).mean(-1, keepdim=True) + eps)
    eff = normed @ model.lm_head.weight.T
    want = eff.topk(6, dim=-1)
    assert torch.equal(top_i, want.indices)
    torch.testing.assert_close(top_v, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(bot_i, eff.topk(6, dim=-1, largest=False).indices)
    lat = read_latent(run, 3)
    assert [v for _, v in lat["top"]][:6] == pytest.approx(
        logit_effects(tiny_lm, sae.W_dec.detach()[3:4], top=10)[0][0, :6].tolist(), rel=1e-5)
    vocab = json.loads((run / "analysis" / "features_vocab.json").read_text())
    assert lat["top"][0][0] == vocab[str(int(logit_effects(tiny_lm, sae.W_dec.detach()[3:4],
                                                           top=1)[1][0, 0]))]
