"""Massive activations (issue 12, item 7): the outlier rule against a brute-force loop, the
same exclusion in training (`batch_activations`) and in `mlsae eval`, and the counts that
eval reports. A forward hook plants huge norms in a tiny random model."""

import json

import pytest
import torch
from conftest import make_tiny_lm

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.activations.capture import (
    REPORT_FACTOR,
    batch_activations,
    exclude_outliers,
    outlier_tally,
)
from mlsae.data import include_mask
from mlsae.evaluate import evaluate
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train

PLANTED = [(0, 5, 1, 400.0), (1, 9, 0, 30.0), (2, 3, 2, 12.0)]  # (row, pos, layer, scale)


@pytest.fixture(scope="module")
def lm():
    lm = make_tiny_lm("llama", n_layers=3)

    def hook(layer):
        def h(_m, _a, out):
            o = out[0] if isinstance(out, tuple) else out
            o = o.clone()
            for r, p, lay, scale in PLANTED:
                if lay == layer and r < o.shape[0] and p < o.shape[1]:
                    o[r, p] *= scale
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
        return h

    for i, b in enumerate(lm.blocks):
        b.register_forward_hook(hook(i))
    return lm


def brute(resid, mask, factor):
    """Per layer and included token (row-major): norm > factor x that layer's median."""
    out = []
    for layer in range(resid.shape[0]):
        norms = [float(resid[layer, r, c].norm()) for r, c in mask.nonzero().tolist()]
        med = sorted(norms)[(len(norms) - 1) // 2]  # torch.median: the lower middle
        out.append([v > factor * med for v in norms])
    return out


def test_rule_and_exclusion_match_brute_force(lm):
    ids = torch.randint(0, 256, (4, 16))
    cfg = DataConfig(exclude_outliers=20.0)
    resid = lm.resid_post(ids, [0, 1, 2])
    mask = include_mask(ids, lm.special_ids, cfg)
    want20 = brute(resid, mask, 20.0)
    want10 = brute(resid, mask, REPORT_FACTOR)
    with outlier_tally() as tally:
        new = exclude_outliers(resid, mask, cfg)
    assert tally.counts.tolist() == [sum(w) for w in want10]
    assert sum(tally.counts.tolist()) >= 3  # the planted ones (and what they carry on)
    dropped = [any(w[t] for w in want20) for t in range(int(mask.sum()))]
    kept = [rc for rc, d in zip(mask.nonzero().tolist(), dropped) if not d]
    assert new.nonzero().tolist() == kept and sum(dropped) == 2 == tally.excluded
    # training takes its vectors through the same rule
    x, m = batch_activations(lm, ids, [0, 1, 2], cfg)
    assert torch.equal(m, new) and x.shape[1] == len(kept)
    assert x.norm(dim=-1).max() < 20 * resid[:, mask].norm(dim=-1).median()
    # off: nothing removed
    assert torch.equal(exclude_outliers(resid, mask, DataConfig(exclude_outliers=0)), mask)


@pytest.mark.parametrize("factor", [20.0])
def test_eval_applies_the_run_setting_and_reports_counts(lm, tmp_path, text_file, factor):
    model_dir = tmp_path / "m"
    lm.model.save_pretrained(model_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(model_dir)
    cfg = RunConfig(SAEConfig(expansion_factor=2, k=4),
                    DataConfig(dataset=str(text_file), ctx_len=16, exclude_outliers=factor),
                    TrainConfig(model=str(model_dir), layers="all", tokens=4 * 16 * 3,
                                batch_size=4, eval_tokens=0, out=str(tmp_path / "run")))
    train(cfg, lm=lm, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["run"]["data"]["exclude_outliers"] == factor
    res = evaluate(tmp_path / "run", TextOptions(tokens=16 * 8, batch_size=4),
                   out=tmp_path / "e.json", lm=lm, progress=False)
    o = res["outliers"]
    sae = MLSAE.from_pretrained(tmp_path / "run")
    data_cfg, batch_list, _ = eval_batches(sae, lm, TextOptions(tokens=16 * 8, batch_size=4))
    counts, excluded = [0, 0, 0], 0
    for ids in batch_list:
        resid = lm.resid_post(ids, [0, 1, 2])
        mask = include_mask(ids, lm.special_ids, data_cfg)
        w10, w20 = brute(resid, mask, 10.0), brute(resid, mask, 20.0)
        counts = [c + sum(w) for c, w in zip(counts, w10)]
        excluded += sum(any(w[t] for w in w20) for t in range(int(mask.sum())))
    assert o["per_layer"] == counts and sum(counts) >= 6 and o["factor_reported"] == 10.0
    assert o["excluded_tokens"] == (excluded if factor else 0) and excluded >= 4
    assert res["included_tokens"] == o["included_tokens"] - o["excluded_tokens"]
    assert json.loads((tmp_path / "e.json").read_text())["outliers"] == o
