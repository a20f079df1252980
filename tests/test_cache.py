"""The activation cache refuses what its dtype cannot hold: float16 tops out at 65504, and
massive activations (Gemma, Llama) exceed it. Before, it silently stored inf."""

import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from mlsae.activations.cache import write_cache
from mlsae.cli import main
from mlsae.config import DataConfig


@pytest.fixture(scope="module")
def loud_model_dir(tmp_path_factory):
    """A tiny Llama whose residual stream reaches ~1e6 (embeddings scaled up)."""
    path = tmp_path_factory.mktemp("loud")
    lm = make_tiny_lm("llama", n_layers=2, d=32)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(1e6)
    lm.model.save_pretrained(path, safe_serialization=True)
    lm.tokenizer.save_pretrained(path)
    return path


def test_float16_overflow_is_refused_in_one_line(loud_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cache"
    code = main(["cache", "--model", str(loud_model_dir), "--dataset", str(text_file),
                 "--ctx-len", "32", "--tokens", "256", "--out", str(out), "--device", "cpu"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if ln.startswith("mlsae")]
    assert len(err) == 1
    assert "--store-dtype float16 cannot hold activation" in err[0]
    assert "bfloat16" in err[0] and "nothing was cached" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_bfloat16_holds_the_same_activations(loud_model_dir, text_file, tmp_path):
    out = write_cache(str(loud_model_dir), tmp_path / "cache", 256, store_dtype="bfloat16",
                      data=DataConfig(dataset=str(text_file), ctx_len=32), device="cpu",
                      progress=False)
    acts = load_file(str(out / "shard_00000.safetensors"))["acts"]
    assert acts.isfinite().all() and acts.abs().max() > 65504
