"""Checkpoint formats (mlsae.formats): SAELens export loaded by the real sae-lens package, the
seed paper's layout against an independent re-statement of its forward, SAELens and sparsify
folders read back as single-layer SAEs, `mlsae export` and `compare` with an outside
baseline."""

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mlsae.cli import main
from mlsae.errors import NotFound, UserError
from mlsae.formats import detect, read
from mlsae.formats.seed import model_from_name
from mlsae.sae import MLSAE

needs_saelens = pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                                   reason="sae-lens is not installed (extra: interop)")
needs_sparsify = pytest.mark.skipif(importlib.util.find_spec("sparsify") is None,
                                    reason="eai-sparsify is not installed (extra: interop)")


def random_sae(d=32, n=128, k=8, seed=0, **kw) -> MLSAE:
    g = torch.Generator().manual_seed(seed)
    sae = MLSAE(d, n, k, config={"model": "tiny", "layers": [0, 1, 2]}, **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, n, generator=g) / math.sqrt(d))
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / math.sqrt(d))
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


@pytest.fixture(scope="module")
def acts(tiny_lm):
    """Real (tiny-LM) resid_post vectors of layers 0-2, included positions only."""
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    x = tiny_lm.resid_post(ids, [0, 1, 2])[:, :, 1:]  # position 0 is never trained on
    return x.reshape(3, -1, x.shape[-1]).clone()


def same_latents(idx_a, acts_a, idx_b, acts_b) -> float:
    """Share of vectors whose sets of active (> 0) latents agree."""
    agree = 0
    for ia, aa, ib, ab in zip(idx_a, acts_a, idx_b, acts_b):
        agree += set(ia[aa > 0].tolist()) == set(ib[ab > 0].tolist())
    return agree / len(idx_a)


# ---- SAELens ---------------------------------------------------------------------------------
def saelens_forward(folder, x):
    from sae_lens import SAE

    sl = SAE.load_from_disk(str(folder))
    feats = sl.encode(x)
    top = feats.topk(sl.cfg.k, dim=-1)
    return sl.decode(feats), top.indices, top.values


@needs_saelens
@pytest.mark.parametrize("convention", ["mlsae", "unbiased_eps_div", "none"])
def test_saelens_export_reproduces_mlsae(acts, tmp_path, convention, topk_path):
    kw = ({"standardize": False} if convention == "none" else {"norm_convention": convention})
    sae = random_sae(**kw)
    res = sae_export(sae, tmp_path)
    assert [p.split("/")[-1] for p in res["folders"]] == ["layer_0", "layer_1", "layer_2"]
    for i, layer in enumerate([0, 1, 2]):
        x = acts[i]
        ours = sae(x)
        x_sl, idx_sl, acts_sl = saelens_forward(tmp_path / f"layer_{layer}", x)
        rel = ((x_sl - ours.x_hat).norm() / ours.x_hat.norm()).item()
        if convention == "mlsae":
            # the documented residual: eps / std of each vector, on the output side
            std = x.float().std(-1, unbiased=False)
            bound = (1e-5 / std).max().item() * 1.01 + 1e-6
        else:
            bound = 1e-6
        assert rel < bound, (rel, bound)
        assert same_latents(ours.code.idx, ours.code.acts, idx_sl, acts_sl) == 1.0


def sae_export(sae, out):
    from mlsae.formats import export

    return export(sae, out, "saelens")


@needs_saelens
def test_saelens_cfg_metadata(tmp_path):
    sae = random_sae()
    sae.config.update(exclude_first=1, exclude_special=True,
                      run={"data": {"ctx_len": 64, "dataset": "pydoc"}, "train": {}})
    sae_export(sae, tmp_path)
    cfg = json.loads((tmp_path / "layer_2" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    assert cfg["normalize_activations"] == "layer_norm"
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["model_name"] == "tiny"
    assert meta["context_size"] == 64 and meta["seqpos_slice"] == [1, None]
    assert meta["prepend_bos"] is False and meta["exclude_special_tokens"] is True
    assert meta["mlsae"]["shared_dictionary"] is True
    assert meta["mlsae"]["folders"] == ["layer_0", "layer_1", "layer_2"]
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(tmp_path / "layer_2"))
    assert loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"


def test_saelens_folder_reads_back_as_single_layer(acts, tmp_path, topk_path):
    sae = random_sae()
    sae_export(sae, tmp_path)
    back = MLSAE.from_pretrained(tmp_path, subfolder="layer_1")
    assert back.layers == [1] and back.norm_convention == "unbiased_eps_div"
    assert back.config["model"] == "tiny"
    x = acts[1]
    a, b = sae(x), back(x)
    assert ((a.x_hat - b.x_hat).norm() / a.x_hat.norm()).item() < 1e-3
    assert same_latents(a.code.idx, a.code.acts, b.code.idx, b.code.acts) == 1.0
    assert detect(tmp_path / "layer_1") == "saelens"


def test_saelens_options_are_folded(acts, tmp_path):
    """apply_b_dec_to_input=false and rescale_acts_by_decoder_norm, checked against a
    by-hand re-statement of SAELens' forward."""
    d, n, k = 32, 64, 6
    g = torch.Generator().manual_seed(3)
    W_enc, W_dec = torch.randn(d, n, generator=g), torch.randn(n, d, generator=g)
    b_enc, b_dec = torch.randn(n, generator=g), torch.randn(d, generator=g)
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": d, "d_sae": n, "k": k, "architecture": "topk", "apply_b_dec_to_input": False,
        "rescale_acts_by_decoder_norm": True, "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_pre",
                     "model_name": "m"}}))
    sae = MLSAE.from_pretrained(folder)
    assert sae.layers == [2]  # resid_pre of block 3 is resid_post of block 2
    x = acts[0]
    norms = W_dec.norm(dim=-1)
    pre = (x @ W_enc + b_enc) * norms
    top = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    want = (dense / norms) @ W_dec + b_dec
    torch.testing.assert_close(sae(x).x_hat, want, rtol=1e-4, atol=1e-4)


def test_cli_export_and_push_to_hub(tmp_path, monkeypatch, capsys):
    sae = random_sae()
    sae.save_pretrained(tmp_path / "run")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(str(p.relative_to(folder_path))
                                                    for p in Path(folder_path).rglob("*")
                                                    if p.is_file())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "sl"
    code = main(["export", str(tmp_path / "run"), "--format", "saelens", "--out", str(out),
                 "--layers", "0,2", "--push-to-hub", "me/tiny-saelens"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["layer_0", "layer_2"]
    assert calls[1] == ("create", "me/tiny-saelens", False)
    assert calls[2] == ("upload", "me/tiny-saelens",
                        ["layer_0/cfg.json", "layer_0/sae_weights.safetensors",
                         "layer_2/cfg.json", "layer_2/sae_weights.safetensors"])
    code = main(["export", str(tmp_path / "run"), "--out", str(out), "--layers", "7"])
    assert code == 2 and "layer 7 is not one of" in capsys.readouterr().err


# ---- the seed paper's layout -----------------------------------------------------------------
def seed_reference(x, enc, dec, pre_bias, k, eps=1e-5):
    """The seed code's forward, re-stated: unbiased std, eps only in the division, no encoder
    bias, top-k then ReLU, recons * std + mean."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    std = xc.std(-1, keepdim=True)  # torch's default: unbiased
    xs = xc / (std + eps)
    latents = (xs - pre_bias) @ enc.T  # encoder = Linear(n_inputs, n_latents, bias=False)
    vals, idx = torch.topk(latents, k, sorted=False)
    vals = torch.relu(vals)
    recons = torch.zeros(x.shape[0], dec.shape[0])
    for j in range(k):  # decoder.weight is [n_inputs, n_latents]
        recons += vals[:, j:j + 1] * dec[:, idx[:, j]].T
    recons = recons + pre_bias
    return recons * std + mu, idx, vals


def write_seed(folder, d=32, n=128, k=8, seed=0, **cfg_extra):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(n, d, generator=g) / math.sqrt(d)
    dec = torch.randn(d, n, generator=g)
    dec /= dec.norm(dim=0)
    pre_bias = torch.randn(d, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file({"encoder.weight": enc, "decoder.weight": dec, "pre_encoder_bias": pre_bias,
               "last_nonzero": torch.zeros(n, dtype=torch.long)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(
        n_inputs=d, n_latents=n, k=k, dead_steps_threshold=1000, dead_threshold=1e-3,
        auxk=16, standardize=True, **cfg_extra)))
    return enc, dec, pre_bias


def test_seed_checkpoint_reproduced_exactly(acts, tmp_path, tiny_model_dir, topk_path):
    enc, dec, pre_bias = write_seed(tmp_path / "seed")
    sae = MLSAE.from_pretrained(tmp_path / "seed", model=str(tiny_model_dir))
    assert sae.norm_convention == "unbiased_eps_div" and sae.layers == [0, 1, 2, 3]
    assert sae.config["model"] == str(tiny_model_dir)
    for i in range(3):
        x = acts[i]
        want, idx, vals = seed_reference(x, enc, dec, pre_bias, 8)
        out = sae(x)
        torch.testing.assert_close(out.x_hat, want, rtol=1e-5, atol=1e-5)
        assert same_latents(out.code.idx, out.code.acts, idx, vals) == 1.0
    # any leading shape, and a round trip through mlsae's own format keeps the convention
    x3 = acts[:, :10]
    torch.testing.assert_close(sae(x3).x_hat[1], sae(acts[1, :10]).x_hat)
    sae.save_pretrained(tmp_path / "native")
    back = MLSAE.from_pretrained(tmp_path / "native")
    assert back.norm_convention == "unbiased_eps_div"
    assert torch.equal(back(acts[0]).x_hat, sae(acts[0]).x_hat)


def test_seed_repo_name_convention():
    assert model_from_name("tim-lawson/mlsae-pythia-70m-deduped-x64-k32") == \
        "EleutherAI/pythia-70m-deduped"
    cache = "/h/models--tim-lawson--mlsae-gpt2-x16-k32/snapshots/abc"
    assert model_from_name(cache) == "gpt2"
    assert model_from_name("runs/whatever") is None
    with pytest.raises(UserError, match="lens"):
        model_from_name("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens")


def test_seed_layers_from_config_and_lens_refused(tmp_path):
    write_seed(tmp_path / "a", layers=[0, 2])
    assert MLSAE.from_pretrained(tmp_path / "a").layers == [0, 2]
    write_seed(tmp_path / "b", lens=True)
    with pytest.raises(UserError, match="tuned lens"):
        MLSAE.from_pretrained(tmp_path / "b")


# ---- sparsify --------------------------------------------------------------------------------
@needs_sparsify
def test_sparsify_folder_reproduced(acts, tmp_path, topk_path):
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    sp = SparseCoder(32, SaeConfig(expansion_factor=4, k=8))
    with torch.no_grad():
        sp.b_dec.normal_(0, 0.1)
        sp.encoder.bias.normal_(0, 0.1)
    sp.save_to_disk(tmp_path / "sp" / "layers.1")
    (tmp_path / "sp" / "config.json").write_text(json.dumps({"model": "tiny-model"}))
    sae = MLSAE.from_pretrained(tmp_path / "sp" / "layers.1")
    assert sae.layers == [1] and sae.config["model"] == "tiny-model" and not sae.standardize
    x = acts[1]
    with torch.no_grad():
        enc = sp.encode(x)
        want = sp.decode(enc.top_acts, enc.top_indices)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, want, rtol=1e-5, atol=1e-5)
    assert same_latents(out.code.idx, out.code.acts, enc.top_indices, enc.top_acts) == 1.0


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        MLSAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError):
        MLSAE(8, 16, 0)
    assert issubclass(NotFound, UserError) and issubclass(UserError, ValueError)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nope")


# ---- compare against a baseline trained by sparsify ------------------------------------------
@needs_sparsify
def test_compare_against_sparsify_trained_baseline(tiny_lm, tiny_model_dir, text_file,
                                                   tmp_path):
    """`compare RUN SPARSIFY_RUN`: sparsify's own Trainer trains single-layer SAEs on layers 0
    and 1 of the tiny LM; compare reads its folders (model.layers.<l>/cfg.json +
    sae.safetensors, here layers.<l>/) as the baselines, and its baseline FVU equals an independent
    computation with sparsify's own forward on the same held-out text."""
    from datasets import Dataset
    from sparsify import SaeConfig, SparseCoder, Trainer
    from sparsify import TrainConfig as SpTrainConfig

    from mlsae import DataConfig, SAEConfig, TrainConfig
    from mlsae.compare import compare
    from mlsae.data import include_mask
    from mlsae.options import TextOptions
    from mlsae.runs import eval_batches
    from mlsae.train import RunConfig, train

    run = tmp_path / "run"
    train(RunConfig(SAEConfig(expansion_factor=2, k=4),
                    DataConfig(dataset=str(text_file), ctx_len=32),
                    TrainConfig(model=str(tiny_model_dir), layers="0,1", tokens=4 * 32 * 4,
                                batch_size=4, eval_tokens=0, dead_tokens=100, out=str(run))),
          lm=tiny_lm, progress=False)
    mlsae_sae = MLSAE.from_pretrained(run)
    opts = TextOptions(tokens=256, batch_size=4)
    _, held_out, _ = eval_batches(mlsae_sae, tiny_lm, opts)
    train_ids = torch.cat(held_out)[:, :].tolist()  # any token sequences will do
    ds = Dataset.from_dict({"input_ids": train_ids * 4}).with_format("torch",
                                                                     columns=["input_ids"])
    sp_cfg = SpTrainConfig(SaeConfig(k=4, expansion_factor=2), batch_size=4, layers=[0, 1],
                           log_to_wandb=False, save_dir=str(tmp_path / "sp"), run_name="run")
    Trainer(sp_cfg, ds, tiny_lm.model).fit()
    sp_root = tmp_path / "sp" / "run"
    hooks = sorted(p.name for p in sp_root.iterdir() if (p / "sae.safetensors").is_file())
    assert hooks == ["layers.0", "layers.1"]

    res = compare(run, sp_root, opts=opts, lm=tiny_lm, progress=False)
    rows = {r["layer"]: r for r in res["rows"]}
    assert set(rows) == {0, 1}
    data_cfg, batches, _ = eval_batches(mlsae_sae, tiny_lm, opts)
    for layer in (0, 1):
        sp = SparseCoder.load_from_disk(sp_root / f"layers.{layer}")
        err = var_sum = 0.0
        xs = []
        for ids in batches:
            mask = include_mask(ids, tiny_lm.special_ids, data_cfg)
            xs.append(tiny_lm.resid_post(ids, [layer])[0][mask].float())
        x = torch.cat(xs)
        with torch.no_grad():
            enc = sp.encode(x)
            x_hat = sp.decode(enc.top_acts, enc.top_indices)
        err = (x_hat - x).pow(2).sum().item()
        var_sum = (x - x.mean(0)).pow(2).sum().item()
        assert rows[layer]["baseline_fvu"] == pytest.approx(err / var_sum, rel=1e-4)
        assert rows[layer]["mlsae_fvu"] is not None
    assert (run / "imported_baselines" / "layers.0" / "eval.json").is_file()


def test_seed_repo_from_a_stand_in_hub(tmp_path, monkeypatch):
    """A hub repo id in the seed's naming convention: the files come through
    snapshot_download (a local stand-in here), the model from the id, all its layers."""
    import huggingface_hub

    import mlsae.lm

    write_seed(tmp_path / "snap", d=32)
    seen = {}

    def fake_download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(mlsae.lm, "peek_shape", lambda name, revision=None: (6, 32))
    sae = MLSAE.from_pretrained("tim-lawson/mlsae-pythia-70m-deduped-x4-k8", revision="v1")
    assert seen["repo_id"] == "tim-lawson/mlsae-pythia-70m-deduped-x4-k8"
    assert seen["revision"] == "v1" and "config.json" in seen["patterns"]
    assert sae.config["model"] == "EleutherAI/pythia-70m-deduped"
    assert sae.layers == list(range(6)) and sae.config["source_format"] == "seed"


def test_cli_convert_then_eval(tmp_path, tiny_model_dir, text_file, capsys):
    write_seed(tmp_path / "seed")
    out = tmp_path / "conv"
    code = main(["convert", str(tmp_path / "seed"), "--out", str(out), "--model",
                 str(tiny_model_dir), "--layers", "1,2"])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_convention"] == "unbiased_eps_div" and cfg["layers"] == [1, 2]
    code = main(["eval", str(out), "--dataset", str(text_file), "--tokens", "128",
                 "--batch-size", "4", "--ctx-len", "32", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    assert res["layers"] == [1, 2] and len(res["per_layer"]["fvu"]) == 2
