import json

import numpy as np
import pytest
import torch

from mlsae.errors import UserError
from mlsae.sae import MLSAE, geometric_median

# Every SAE-math test runs on both top-k paths (C kernel and torch.topk): see conftest.
pytestmark = pytest.mark.usefixtures("topk_path")


def make_sae(d=16, n=64, k=4, seed=0, standardize=True):
    sae = MLSAE(d, n, k, standardize=standardize, config={"model": "x", "layers": [0, 1]})
    g = torch.Generator().manual_seed(seed)
    sae.reset_parameters(g)
    with torch.no_grad():  # non-trivial biases so every gradient path is exercised
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


def dense_reference(sae, x, dead=None, auxk=0):
    """Plain autograd TopK SAE with a dense [N, n_latents] code: the independent check."""
    mu = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    if not sae.standardize:
        mu, std = torch.zeros_like(mu), torch.ones_like(std) - sae.eps
    xt = (x - mu) / (std + sae.eps)
    pre = (xt - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    mask = torch.zeros_like(pre).scatter(1, top.indices, 1.0)
    acts = torch.relu(pre) * mask
    x_hat = (acts @ sae.W_dec + sae.b_dec) * (std + sae.eps) + mu
    aux = None
    if dead is not None:
        masked = pre.masked_fill(~dead, float("-inf"))
        t = masked.topk(min(auxk, int(dead.sum())), dim=-1)
        amask = torch.zeros_like(pre).scatter(1, t.indices, 1.0) * dead
        aux = torch.relu(pre) * amask @ sae.W_dec
    return x_hat, acts, aux


def test_forward_matches_dense():
    sae = make_sae()
    x = torch.randn(50, 16) * 3 + 1
    out = sae(x)
    ref, acts, _ = dense_reference(sae, x)
    torch.testing.assert_close(out.x_hat, ref, rtol=1e-5, atol=1e-5)
    dense = torch.zeros(50, 64).scatter(1, out.code.idx, out.code.acts)
    torch.testing.assert_close(dense, acts)
    assert (out.code.acts >= 0).all()


@pytest.mark.parametrize("standardize,every", [(True, 3), (False, 3), (True, 20)])
def test_sparse_backward_matches_dense_autograd(standardize, every):
    """every=20 leaves 4 dead latents, fewer than auxk=6: only those 4 may be used."""
    x = torch.randn(40, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::every] = True
    grads = []
    for sparse in (True, False):
        sae = make_sae(standardize=standardize)
        if sparse:
            out = sae(x, dead=dead, auxk=6)
            x_hat = out.x_hat
            from mlsae.sae import sparse_decode
            aux = sparse_decode(out.aux_acts, out.aux_idx, sae.W_dec)
        else:
            x_hat, _, aux = dense_reference(sae, x, dead=dead, auxk=6)
        loss = (x_hat - x).pow(2).sum() + 0.3 * (aux - x[:, :16]).pow(2).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4,
                                   msg=name)


def test_encode_decode_roundtrip_shapes():
    sae = make_sae()
    x = torch.randn(3, 5, 16)
    code = sae.encode(x)
    assert code.acts.shape == (3, 5, 4) and code.idx.shape == (3, 5, 4)
    torch.testing.assert_close(sae.decode(code), sae(x.reshape(-1, 16)).x_hat.reshape(3, 5, 16))


def test_standardize_makes_input_scale_invariant():
    sae = make_sae()
    x = torch.randn(10, 16)
    a, b = sae.encode(x), sae.encode(x * 7 + 3)
    assert torch.equal(a.idx.sort(-1).values, b.idx.sort(-1).values)
    torch.testing.assert_close(sae.decode(b), sae.decode(a) * 7 + 3, rtol=1e-4, atol=1e-4)


def test_decoder_constraints():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_init():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_geometric_median_beats_mean_and_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    x[:10] += 100  # outliers pull the mean, not the median
    med = geometric_median(x)

    def cost(p):
        return (x - p).norm(dim=1).sum()

    assert cost(med) < cost(x.mean(0))
    assert med.norm() < 1.0
    # first-order optimality: the unit vectors towards the points sum to ~0
    u = (x - med) / (x - med).norm(dim=1, keepdim=True)
    assert u.sum(0).norm() < 1e-2 * len(x)


def test_save_load_roundtrip(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["d_model"] == 16 and cfg["n_latents"] == 64 and cfg["k"] == 4
    assert cfg["layers"] == [0, 1] and cfg["format_version"] == 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["W_dec", "W_enc", "b_dec", "b_enc"]
        assert tuple(f.get_tensor("W_enc").shape) == (16, 64)
        assert tuple(f.get_tensor("W_dec").shape) == (64, 16)
    back = MLSAE.from_pretrained(tmp_path / "ck")
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, n), getattr(sae, n))
    x = torch.randn(4, 16)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)


def test_load_errors(tmp_path):
    sae = make_sae()
    sae.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt model.safetensors"):
        MLSAE.from_pretrained(tmp_path / "ck")
    f.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="corrupt model.safetensors"):
        MLSAE.from_pretrained(tmp_path / "ck")
    f.unlink()
    with pytest.raises(UserError, match="missing model.safetensors"):
        MLSAE.from_pretrained(tmp_path / "ck")
    with pytest.raises(UserError, match="no such folder"):
        MLSAE.from_pretrained(tmp_path / "nope")


def test_shape_mismatch_in_checkpoint(tmp_path):
    make_sae().save_pretrained(tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_latents"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="W_enc is"):
        MLSAE.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("k", [0, -1, 65])
def test_bad_k(k):
    with pytest.raises(UserError, match="k must be in 1..n_latents"):
        MLSAE(16, 64, k)


def test_no_dense_code_in_decode():
    """Decoding gathers k rows: the embedding_bag result equals the explicit gather sum."""
    sae = make_sae()
    acts = torch.rand(7, 4)
    idx = torch.randint(0, 64, (7, 4))
    want = np.einsum("nk,nkd->nd", acts.numpy(), sae.W_dec.detach().numpy()[idx.numpy()])
    got = sae.decode_standardized(acts, idx) - sae.b_dec
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_missing_checkpoint_that_looks_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such folder, and not downloadable"):
        MLSAE.from_pretrained("runs/nosuch")


@pytest.mark.parametrize("standardize", [True, False])
def test_forward_train_error_and_gradients_match_dense(standardize):
    """forward_train's per-vector error (taken in standardized space) equals
    ||x_hat - x||^2 of the dense reference, and so do all gradients, AuxK included."""
    from mlsae.sae import sparse_decode
    x = torch.randn(40, 16) * 2 + 0.5
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True
    w = torch.rand(40)  # arbitrary per-vector loss weights, as per-layer 1/var would be
    grads = []
    for fused in (True, False):
        sae = make_sae(standardize=standardize)
        if fused:
            out = sae.forward_train(x, dead=dead, auxk=6)
            err = out.err
            ref_x_hat, _, _ = dense_reference(sae, x)
            torch.testing.assert_close(err, (ref_x_hat - x).pow(2).sum(-1), rtol=1e-4,
                                       atol=1e-4)
            scale = out.code.std + sae.eps
            torch.testing.assert_close(out.resid * scale, ref_x_hat.detach() - x, rtol=1e-4,
                                       atol=1e-4)
            aux = sparse_decode(out.aux_acts, out.aux_idx, sae.W_dec)
        else:
            x_hat, _, aux = dense_reference(sae, x, dead=dead, auxk=6)
            err = (x_hat - x).pow(2).sum(-1)
        loss = (w * err).sum() + 0.3 * (aux - x).pow(2).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4,
                                   msg=name)


def test_encoder_chunks_give_the_same_code(monkeypatch):
    """Row chunking of the encoder (bounding the dense pre-activations) selects the same
    latents (values equal up to the matmul's rounding, which depends on the row count)."""
    import mlsae.sae.ops as S
    g = torch.Generator().manual_seed(1)
    x, W, b = torch.randn(100, 16, generator=g), torch.randn(16, 64, generator=g), \
        torch.randn(64, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[3::4] = True
    whole = S.encoder_topk(x, W, b, 5, dead=dead, auxk=3)
    monkeypatch.setattr(S, "_rows_per_chunk", lambda *_: 7)
    chunked = S.encoder_topk(x, W, b, 5, dead=dead, auxk=3)
    for a, c in zip(whole, chunked):
        if a.is_floating_point():
            torch.testing.assert_close(a, c)
        else:
            assert torch.equal(a, c)
    pre = x @ W + b
    torch.testing.assert_close(whole[0].sort(-1).values, pre.topk(5).values.sort(-1).values)
    assert dead[whole[3]].all()
    aux_ref = pre.masked_fill(~dead, float("-inf")).topk(3).values
    torch.testing.assert_close(whole[2].sort(-1).values, aux_ref.sort(-1).values)


def test_sparse_transposed_matmul_matches_dense():
    from mlsae.sae.ops import _sparse_t_matmul
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(50)])
    vals, x = torch.randn(50, 4, generator=g), torch.randn(50, 8, generator=g)
    dense = torch.zeros(50, 30).scatter(1, idx, vals)
    torch.testing.assert_close(_sparse_t_matmul(idx.flatten(), vals.flatten(), x, 30, 4),
                               dense.T @ x)


def test_no_dead_latents_means_no_aux_code():
    sae = make_sae()
    out = sae(torch.randn(10, 16), dead=torch.zeros(64, dtype=torch.bool), auxk=6)
    assert out.aux_acts is None and out.aux_idx is None


def test_standardize_is_differentiable():
    """With an input that requires grad, standardizing keeps autograd intact and matches
    torch.std's gradient."""
    sae = make_sae()
    x = (torch.randn(6, 16) * 3 + 1).requires_grad_()
    xt, _, _ = sae.preprocess(x)
    (g,) = torch.autograd.grad(xt.pow(3).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    ref = (x2 - x2.mean(-1, keepdim=True)) / (x2.std(-1, keepdim=True, unbiased=False) + sae.eps)
    (g2,) = torch.autograd.grad(ref.pow(3).sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("standardize", [True, False])
def test_input_gradient_matches_dense_autograd(standardize):
    """Gradients reach the SAE's input (attribution patching, integrated gradients): d x_hat /
    d x through standardizing, the selected encoder columns and un-standardizing."""
    sae = make_sae(standardize=standardize)
    x = (torch.randn(30, 16) * 2 + 0.5).requires_grad_()
    w = torch.randn(30, 16)
    (g,) = torch.autograd.grad((sae(x).x_hat * w).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    ref, _, _ = dense_reference(sae, x2)
    (g2,) = torch.autograd.grad((ref * w).sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-5)
    # through the training forward too (per-vector error), and the encode path alone
    x3 = x.detach().clone().requires_grad_()
    (g3,) = torch.autograd.grad(sae.forward_train(x3).err.sum(), x3)
    x4 = x.detach().clone().requires_grad_()
    ref4, _, _ = dense_reference(sae, x4)
    (g4,) = torch.autograd.grad((ref4 - x4).pow(2).sum(), x4)
    torch.testing.assert_close(g3, g4, rtol=1e-3, atol=1e-4)


def test_auxk_code_equals_dense_topk_of_dead_latents():
    """The dead latents' top-auxk code is the top-auxk of their own pre-activations (encoder
    bias added once), on either top-k path."""
    sae = make_sae()
    x = torch.randn(25, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::4] = True
    out = sae(x, dead=dead, auxk=5)
    xt, _, _ = sae.preprocess(x)
    pre = ((xt - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    ref = pre.masked_fill(~dead, float("-inf")).topk(5, dim=-1)
    torch.testing.assert_close(out.aux_acts.sort(-1).values, ref.values.relu().sort(-1).values)
    assert (out.aux_idx.sort(-1).values == ref.indices.sort(-1).values).all()

