"""`MLSAE.spliced`: the SAE inside any causal LM (tiny models), against `mlsae eval`'s CE_recon
and by-hand reconstructions; the Python API around it (dense codes, any leading shape,
bfloat16, layers)."""

import math

import pytest
import torch

from mlsae import DataConfig
from mlsae.config import to_dict
from mlsae.data import include_mask
from mlsae.evaluate import evaluate
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE


def make_sae(model_dir, text_file, d=32, n=128, k=8, layers=(0, 2)) -> MLSAE:
    g = torch.Generator().manual_seed(0)
    data = DataConfig(dataset=str(text_file), ctx_len=32)
    sae = MLSAE(d, n, k, config={"model": str(model_dir), "layers": list(layers),
                                 "exclude_first": 1, "exclude_special": True,
                                 "run": {"data": to_dict(data)}})
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, n, generator=g) / math.sqrt(d))
        sae.W_dec.copy_(sae.W_enc.T * 0.5)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.05)
    return sae


@pytest.fixture(scope="module")
def sae(tiny_model_dir, text_file):
    return make_sae(tiny_model_dir, text_file)


def ids_with_special(lm):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 5] = lm.eos_id
    return ids


def test_splice_matches_eval_ce_recon(sae, tiny_lm, tmp_path):
    sae.save_pretrained(tmp_path / "ck")
    opts = TextOptions(tokens=256, batch_size=4)
    res = evaluate(tmp_path / "ck", opts, out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    data_cfg, batches, _ = eval_batches(sae, tiny_lm, opts)
    for i, layer in enumerate([0, 2]):
        total, n = 0.0, 0
        with sae.spliced(tiny_lm, layers=[layer]):
            for ids in batches:
                logits = tiny_lm.model(input_ids=ids).logits
                pos = include_mask(ids, tiny_lm.special_ids, data_cfg)[:, :-1]
                logp = logits[:, :-1][pos].float().log_softmax(-1)
                total += -logp.gather(1, ids[:, 1:][pos][:, None]).sum().item()
                n += int(pos.sum())
        got, want = total / n, res["per_layer"]["ce_recon"][i]
        assert abs(got - want) < 1e-5 * max(1.0, abs(want)), (layer, got, want)
        assert abs(got - res["per_layer"]["ce_clean"][i]) > 1e-4  # the splice did something


def test_positions_layers_and_edits(sae, tiny_lm):
    ids = ids_with_special(tiny_lm)
    clean = tiny_lm.resid_post(ids, [0, 1, 2])
    with sae.spliced(tiny_lm, layers=[2]):
        got = tiny_lm.resid_post(ids, [0, 1, 2])
    mask = include_mask(ids, tiny_lm.special_ids, DataConfig())
    assert not mask[:, 0].any() and not mask[0, 5]
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])  # other layers
    assert torch.equal(got[2][~mask], clean[2][~mask])  # position 0 and EOS untouched
    out = sae(clean[2][mask])
    torch.testing.assert_close(got[2][mask], out.x_hat)
    # ablate one active latent and scale another: a by-hand dense edit of the code
    f, g2 = int(out.code.idx[0, 0]), int(out.code.idx[1, 1])
    dense = out.code.dense(sae.n_latents)
    dense[..., f] = 0
    dense[..., g2] *= 2.5
    want = sae.decode_dense(dense, out.code)
    with sae.spliced(tiny_lm.model, layers=[2], latents={f: 0.0, g2: 2.5}):
        edited = tiny_lm.resid_post(ids, [2])[0]
    torch.testing.assert_close(edited[mask], want, rtol=1e-5, atol=1e-5)
    # reconstruction + error is the identity; with an edit, only the edit's effect remains
    with sae.spliced(tiny_lm, layers=[2], error=True):
        ident = tiny_lm.resid_post(ids, [2])[0]
    torch.testing.assert_close(ident, clean[2], rtol=1e-5, atol=1e-5)
    with sae.spliced(tiny_lm, layers=[2], error=True, latents=[f]):
        only = tiny_lm.resid_post(ids, [2])[0]
    dense_f = out.code.dense(sae.n_latents)
    dense_f[..., f] = 0
    effect = sae.decode_dense(dense_f, out.code) - out.x_hat  # what ablating f changes
    torch.testing.assert_close(only[mask] - clean[2][mask], effect, rtol=1e-4, atol=1e-5)
    assert torch.equal(only[~mask], clean[2][~mask])
    after = tiny_lm.resid_post(ids, [2])[0]
    assert torch.equal(after, clean[2])  # hooks gone on exit


def test_generate_with_and_without_cache_agree(sae, tiny_lm):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    model = tiny_lm.model
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=258)
    with sae.spliced(model, layers=[0, 2]):
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        full = model(input_ids=cached).logits
    assert torch.equal(cached, uncached)
    # each generated token is the argmax of one spliced forward over the whole sequence
    assert torch.equal(full[0, 5:-1].argmax(-1), cached[0, 6:])
    clean = model.generate(ids, use_cache=True, **kw)
    assert clean.shape == cached.shape


def test_sae_api_shapes_dense_and_bfloat16(sae, tiny_lm, topk_path):
    x = tiny_lm.resid_post(ids_with_special(tiny_lm), [1])[0]  # [2, 12, d]
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.code.idx.shape == (2, 12, sae.k)
    flat = sae(x.reshape(-1, x.shape[-1]))
    torch.testing.assert_close(out.x_hat.reshape(-1, x.shape[-1]), flat.x_hat)
    dense = out.code.dense(sae.n_latents)
    assert dense.shape == (2, 12, sae.n_latents) and (dense > 0).sum(-1).max() <= sae.k
    torch.testing.assert_close(sae.decode_dense(dense, out.code), out.x_hat, rtol=1e-5,
                               atol=1e-5)
    assert sae.layers == [0, 2]
    half = MLSAE.from_checkpoint(sae.full_config(), dict(sae.state_dict()),
                                 dtype=torch.bfloat16)
    assert half.W_enc.dtype == torch.bfloat16
    hb = half(x)
    rel = ((hb.x_hat - out.x_hat).norm() / out.x_hat.norm()).item()
    assert hb.x_hat.dtype == torch.float32 and rel < 0.05, rel
    with half.spliced(tiny_lm, layers=[1]):
        tiny_lm.logits(ids_with_special(tiny_lm))


def test_splice_errors(sae, tiny_lm):
    with pytest.raises(ValueError, match="out of range"):
        with sae.spliced(tiny_lm, layers=[9]):
            pass
