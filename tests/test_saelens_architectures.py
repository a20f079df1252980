"""SAELens exchange for every architecture, in the real sae-lens package: `mlsae export
--format saelens` of each architecture loads in SAELens and reproduces mlsae's inference-form
reconstruction to < 1e-4 relative error with the same active latents; and folders the real
sae-lens wrote (`jumprelu` inference folders, `batchtopk` and `matryoshka_batchtopk` training
folders) read back into mlsae and reproduce SAELens' own inference output."""

import importlib.util
import json

import pytest
import torch

from mlsae.errors import UserError
from mlsae.formats import export
from mlsae.sae import MLSAE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                                reason="sae-lens is not installed (extra: interop)")
ARCHS = ["batchtopk", "token-topk", "jumprelu", "matryoshka", "topk"]


@pytest.fixture(scope="module")
def acts(tiny_lm):
    """Real (tiny-LM) resid_post vectors of layers 0-2, included positions only."""
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    x = tiny_lm.resid_post(ids, [0, 1, 2])[:, :, 1:]
    return x.reshape(3, -1, x.shape[-1]).clone()


def random_sae(arch: str, seed: int = 0, **kw) -> MLSAE:
    g = torch.Generator().manual_seed(seed)
    sae = MLSAE(32, 128, 8, config={"model": "tiny", "layers": [0, 1, 2]}, architecture=arch,
                **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 128, generator=g) / 32 ** 0.5)
        sae.b_enc.copy_(torch.randn(128, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(128, 32, generator=g) / 32 ** 0.5)
        sae.b_dec.copy_(torch.randn(32, generator=g) * 0.1)
        if arch == "jumprelu":  # one threshold per latent
            sae.threshold.copy_(torch.rand(128, generator=g) * 0.6)
        elif arch != "topk":  # the running-threshold rules: one theta for every latent
            sae.threshold.fill_(0.35)
    return sae


def active_sets(acts: torch.Tensor, idx: torch.Tensor) -> list[set]:
    return [set(i[a > 0].tolist()) for a, i in zip(acts, idx)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("convention", ["mlsae", "unbiased_eps_div"])
def test_export_reproduces_mlsae_in_saelens(arch, convention, acts, tmp_path):
    from sae_lens import SAE

    sae = random_sae(arch, norm_convention=convention)
    export(sae, tmp_path, "saelens")
    for i, layer in enumerate([0, 1, 2]):
        folder = tmp_path / f"layer_{layer}"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
        sl = SAE.load_from_disk(str(folder))
        # The tiny LM's vectors have std ~0.02; mlsae's convention leaves a residual of
        # eps / std per vector (mlsae.formats.saelens), so use SmolLM2-like scales (std ~1).
        x = acts[i] * 50
        ours = sae(x)  # each vector alone: the inference form
        feats = sl.encode(x)
        rel = ((sl.decode(feats) - ours.x_hat).norm() / ours.x_hat.norm()).item()
        assert rel < 1e-4, (arch, layer, rel)
        theirs = [set(f.nonzero().flatten().tolist()) for f in feats]
        assert theirs == active_sets(ours.code.acts, ours.code.idx)
        assert 0 < sum(map(len, theirs)) < 128 * len(theirs)  # a real, sparse test
        # and back: the folder reads as the same architecture, same code
        back = MLSAE.from_pretrained(folder)
        assert back.architecture == arch
        again = back(x)
        assert active_sets(again.code.acts, again.code.idx) == theirs


def _randomize(sl, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            p = getattr(sl, name)
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.startswith("W") else 0.1))


def _saelens_inference(sl, tmp_path, x):
    """What SAELens itself computes for its saved inference form of `sl`."""
    from sae_lens import SAE

    sl.save_inference_model(str(tmp_path / "inference"))
    inf = SAE.load_from_disk(str(tmp_path / "inference"))
    feats = inf.encode(x)
    return inf.decode(feats), [set(f.nonzero().flatten().tolist()) for f in feats]


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("norm", ["layer_norm", "none"])
def test_reads_saelens_training_folders(kind, norm, acts, tmp_path):
    if kind == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as Cls
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig as Cfg
        extra = {}
    else:
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE as Cls,
        )
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAEConfig as Cfg,
        )
        extra = {"matryoshka_widths": [16, 64, 128]}
    sl = Cls(Cfg(d_in=32, d_sae=128, k=8, normalize_activations=norm, **extra))
    _randomize(sl, 2)
    sl.topk_threshold = torch.tensor(0.4)
    sl.save_model(str(tmp_path / "train"))
    sae = MLSAE.from_pretrained(tmp_path / "train", layers=[1])
    assert sae.architecture == ("batchtopk" if kind == "batchtopk" else "matryoshka")
    assert torch.allclose(sae.threshold, torch.full((128,), 0.4))
    if kind != "batchtopk":
        assert sae.arch.prefixes(sae) == [16, 64, 128]
    x = acts[1]
    want, sets = _saelens_inference(sl, tmp_path, x)
    ours = sae(x)
    assert ((ours.x_hat - want).norm() / want.norm()).item() < 1e-4
    assert active_sets(ours.code.acts, ours.code.idx) == sets


def test_reads_saelens_jumprelu_folder(acts, tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    sl = JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=128, normalize_activations="layer_norm"))
    _randomize(sl, 3)
    with torch.no_grad():
        sl.threshold.copy_(torch.rand(128, generator=torch.Generator().manual_seed(4)) * 0.5)
    sl.save_model(str(tmp_path / "jr"))
    sae = MLSAE.from_pretrained(tmp_path / "jr", layers=[2])
    assert sae.architecture == "jumprelu"
    loaded = SAE.load_from_disk(str(tmp_path / "jr"))
    x = acts[2]
    feats = loaded.encode(x)
    want = loaded.decode(feats)
    ours = sae(x)
    assert ((ours.x_hat - want).norm() / want.norm()).item() < 1e-4
    assert active_sets(ours.code.acts, ours.code.idx) == \
        [set(f.nonzero().flatten().tolist()) for f in feats]


def test_unknown_saelens_architecture_is_one_line(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "gated"
    folder.mkdir()
    save_file({"W_enc": torch.zeros(4, 8)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8,
                                                 "architecture": "gated"}))
    with pytest.raises(UserError, match="SAELens architecture 'gated'; mlsae reads topk, "
                                        "jumprelu, batchtopk, matryoshka_batchtopk"):
        MLSAE.from_pretrained(folder)
