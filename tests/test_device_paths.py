"""The SAE's math and a short training on every device in $MLSAE_TEST_DEVICES (default: cpu),
against dense float64 references computed on the CPU. CI runs it on the CPU; on a machine with
an NVIDIA GPU `bench/gpu_check.sh` runs it with MLSAE_TEST_DEVICES=cpu,cuda, which exercises
the torch.topk path, the GPU chunk size and float64 statistics on the device."""

import os

import pytest
import torch
from test_loss import AUXK, N, dense_loss, make_sae, make_x
from test_sae import dense_reference
from test_sae import make_sae as make_small_sae

from mlsae.train.loss import loss

DEVICES = [d for d in os.environ.get("MLSAE_TEST_DEVICES", "cpu").split(",") if d]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    dev = torch.device(request.param)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        pytest.skip("no MPS device")
    return dev


def test_forward_and_input_gradient_match_cpu_dense(device):
    sae = make_small_sae()
    x = torch.randn(64, 16) * 2 + 0.5
    ref, acts, _ = dense_reference(sae, x)
    xd = x.to(device).requires_grad_()
    out = sae.to(device)(xd)
    torch.testing.assert_close(out.x_hat.cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    dense = torch.zeros(64, 64, device=device).scatter(1, out.code.idx, out.code.acts)
    torch.testing.assert_close(dense.cpu(), acts.detach(), rtol=1e-4, atol=1e-4)
    (g,) = torch.autograd.grad(out.x_hat.sum(), xd)
    x2 = x.clone().requires_grad_()
    ref2, _, _ = dense_reference(sae.cpu(), x2)
    (g2,) = torch.autograd.grad(ref2.sum(), x2)
    torch.testing.assert_close(g.cpu(), g2, rtol=1e-3, atol=1e-4)


def test_loss_with_dead_latents_matches_dense_restatement(device):
    sae, x = make_sae(), make_x()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = loss(sae.to(device), x.to(device), dead, auxk=AUXK, auxk_coef=0.5)
    out.loss.backward()
    grads = [p.grad.cpu() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    total, err, var, aux, fired, l0, ref_grads = dense_loss(sae.cpu(), x, dead, 0.5)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-4)
    assert out.aux_loss == pytest.approx(aux.item(), rel=1e-4)
    torch.testing.assert_close(out.err.cpu(), err.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(out.fired.cpu(), fired)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-5)


def test_short_training_on_device_matches_cpu(device, tiny_lm, text_file, tmp_path):
    """Three steps on the device land where three steps on the CPU land (float tolerance)."""
    from test_train import small_cfg

    from mlsae.train import train

    runs = {}
    for name, dev in (("cpu", "cpu"), ("dev", str(device))):
        cfg = small_cfg(text_file, tmp_path / name, tokens=4 * 32 * 3, eval_tokens=0,
                        device=dev, sae_matmul_dtype="float32")
        runs[name] = train(cfg, lm=tiny_lm, progress=False)["trainer"].sae
    for n, p in runs["cpu"].named_parameters():
        torch.testing.assert_close(getattr(runs["dev"], n).detach().cpu(), p.detach(),
                                   rtol=1e-3, atol=1e-4, msg=n)
