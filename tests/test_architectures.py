"""The architectures (SPEC §3a) against independent re-statements: the batch and per-token
budgets select exactly the brute-force top k x N / k x L of a dense matrix, the threshold
update follows its formula, JumpReLU's gradients equal a dense re-statement of its
straight-through estimators, the Matryoshka loss is the documented mean of prefix FVUs; and
each architecture trains, saves, loads, resumes bit-identically and sweeps; TopK's numbers
are those of the last release (a run folder it wrote is kept in tests/data)."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.config import ARCH_OPTIONS
from mlsae.errors import UserError
from mlsae.sae import ARCHITECTURES, MLSAE
from mlsae.sae import ops as S
from mlsae.train import RunConfig, train
from mlsae.train.loss import loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCHS = ["topk", "batchtopk", "token-topk", "jumprelu", "matryoshka"]
# Run folders written by the last release (b78853b), one per top-k path: the C kernel and
# torch.topk return the selected entries in different orders, so sums differ in the last bit
RELEASE_RUNS = {"kernel": Path(__file__).parent / "data" / "release_topk_run",
                "torch": Path(__file__).parent / "data" / "release_topk_run_torch"}


def dense_pre(sae: MLSAE, x: torch.Tensor) -> torch.Tensor:
    """z = (x~ - b_dec) W_enc + b_enc, dense, float64."""
    xt, _, _ = sae.preprocess(x)
    return ((xt.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double())


def as_set(code_idx, code_acts) -> set:
    rows, slots = (code_acts > 0).nonzero(as_tuple=True)
    return {(int(r), int(code_idx[r, s])) for r, s in zip(rows, slots)}


def random_sae(arch: str, d=16, n=96, k=4, seed=0) -> MLSAE:
    torch.manual_seed(seed)
    sae = MLSAE(d, n, k, architecture=arch)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
    return sae


def skewed_x(n_rows: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    """Rows of very different scale after the encoder (a few rows want far more than 2k
    latents), so the exact selection must re-scan saturated rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d, generator=g)
    x[::7] *= 0.05  # standardization undoes the scale: sharpen some rows' direction instead
    return x


@pytest.mark.parametrize("chunk", [None, 5])
def test_batchtopk_selects_exactly_the_batch_top_kN(topk_path, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(S, "_rows_per_chunk", lambda *_: chunk)
    sae = random_sae("batchtopk")
    with torch.no_grad():  # make a few latents dominate some rows: saturation re-scans
        sae.W_enc[:, :20] += sae.W_enc[:, :1] * 3
    x = skewed_x(40)
    out = sae.forward_train(x)
    z = dense_pre(sae, x).relu()
    top = z.flatten().topk(4 * 40).indices
    want = {(int(i) // 96, int(i) % 96) for i in top if z.flatten()[i] > 0}
    assert as_set(out.code.idx, out.code.acts) == want
    counts = (out.code.acts > 0).sum(1)
    assert counts.max() > 8 or counts.min() < 4  # a budget over the batch, not per vector
    # values are the pre-activations themselves
    r, s = (out.code.acts > 0).nonzero(as_tuple=True)
    torch.testing.assert_close(out.code.acts[r, s].double(), z[r, out.code.idx[r, s]],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_token_topk_selects_each_tokens_top_kL(topk_path, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(S, "_rows_per_chunk", lambda *_: chunk)
    sae = random_sae("token-topk", k=3)
    L, T = 4, 9
    x = skewed_x(L * T, seed=2)  # rows ordered [layer, token]
    with torch.no_grad():
        sae.W_enc[:, :30] += sae.W_enc[:, :1] * 3
    out = sae.forward_train(x, n_layers=L)
    z = dense_pre(sae, x).relu().view(L, T, 96)
    want = set()
    for t in range(T):  # brute force per token over its L layer vectors
        flat = z[:, t].flatten()
        for i in flat.topk(3 * L).indices:
            if flat[i] > 0:
                want.add((int(i) // 96 * T + t, int(i) % 96))
    assert as_set(out.code.idx, out.code.acts) == want
    per_token = (out.code.acts > 0).sum(1).view(L, T).sum(0)
    assert (per_token <= 3 * L).all()
    # the per-token rule at inference (encode_layers) selects the same entries
    code = sae.encode_layers(x.view(L, T, 16))
    assert as_set(code.idx.reshape(L * T, -1), code.acts.reshape(L * T, -1)) == want


@pytest.mark.parametrize("arch", ["batchtopk", "token-topk", "matryoshka", "jumprelu"])
def test_threshold_inference_keeps_exactly_entries_above_threshold(arch):
    sae = random_sae(arch)
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(96) * 0.8)
    x = skewed_x(30)
    code = sae.encode(x)
    z = dense_pre(sae, x)
    want = {(int(r), int(c)) for r, c in (z > sae.threshold.double()).nonzero()}
    assert as_set(code.idx, code.acts) == want
    # one vector alone encodes as it does in a batch
    one = sae.encode(x[3:4])
    assert as_set(one.idx, one.acts) == {(0, c) for r, c in want if r == 3}


def test_running_threshold_follows_its_formula(tiny_lm, text_file, tmp_path):
    """theta starts at the first batch's smallest kept activation, then theta <- (1 - lr)
    theta + lr min, lr = max(0.01, 10 / steps) by default (12 steps: 0.833); the minimum is
    re-computed here from the training forward of each step."""
    cfg = small_cfg(text_file, tmp_path / "run", "batchtopk", tokens=4 * 32 * 12)
    seen = []
    orig = MLSAE.forward_train

    def spy(self, x, *a, **kw):
        out = orig(self, x, *a, **kw)
        acts = out.code.acts.detach()
        seen.append(float(acts[acts > 0].min()))
        return out

    MLSAE.forward_train = spy
    try:
        res = train(cfg, lm=tiny_lm, progress=False)
    finally:
        MLSAE.forward_train = orig
    lr = res["trainer"].sae.arch.opts["threshold_lr"]
    assert lr == 10 / 12
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threshold_lr"] == lr
    theta = seen[0]
    for low in seen[1:12]:
        theta = (1 - lr) * theta + lr * low
    got = res["trainer"].sae.threshold
    assert torch.allclose(got, torch.full_like(got, theta), rtol=1e-6)


def test_jumprelu_gradients_equal_a_dense_restatement():
    """Every gradient (encoder, decoder, biases, thresholds) of the sparse implementation equals
    a dense re-statement: a = z H(z - theta); d a/d theta = -(theta/eps) K((z-theta)/eps);
    d L0/d theta = -(1/eps) K((z-theta)/eps), K the unit rectangle."""
    torch.manual_seed(0)
    sae = MLSAE(12, 40, 4, architecture="jumprelu", arch_options={"bandwidth": 0.3})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.threshold.copy_(torch.rand(40) * 0.6 + 0.2)
    x = torch.randn(25, 12)
    lam = 0.05
    out = sae.forward_train(x)
    (out.err.sum() + lam * out.penalty.sum()).backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}

    W_enc, b_enc, W_dec, b_dec, theta = (p.detach().double().requires_grad_()
                                         for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                                   sae.threshold))
    xt, _, std = (t.double() for t in sae.preprocess(x))
    z = (xt - b_dec) @ W_enc + b_enc
    eps = 0.3
    on = (z > theta).double()
    a = z * on.detach()  # d a / d z = H: the mask is a constant
    K = ((z - theta).abs() < eps / 2).double().detach()
    weight = (std + sae.eps).square().squeeze(-1)
    (weight * (a @ W_dec + b_dec - xt).square().sum(1)).sum().backward()
    # dL/da by autograd on a leaf copy of a
    a_leaf = a.detach().requires_grad_()
    L2 = (weight * ((a_leaf @ W_dec.detach() + b_dec.detach() - xt).square().sum(1))).sum()
    (dLda,) = torch.autograd.grad(L2, [a_leaf])
    grad_theta = (dLda * (-(theta.detach() / eps) * K)).sum(0) + lam * (-(1 / eps) * K).sum(0)
    torch.testing.assert_close(sparse["threshold"].double(), grad_theta, rtol=1e-4, atol=1e-4)
    for name, p in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        torch.testing.assert_close(sparse[name].double(), p.grad, rtol=1e-4, atol=1e-4,
                                   msg=name)


def test_jumprelu_threshold_gradient_matches_finite_differences_of_the_smoothed_step():
    """With a rectangle kernel, the STE of L0 in theta is the exact derivative of the
    smoothed count sum clip((z - theta)/eps + 1/2, 0, 1): checked by central differences."""
    torch.manual_seed(1)
    sae = MLSAE(10, 30, 3, architecture="jumprelu", arch_options={"bandwidth": 0.4})
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(30) * 0.5 + 0.3)
    x = torch.randn(20, 10)
    out = sae.forward_train(x)
    out.penalty.sum().backward()
    z = dense_pre(sae, x)

    def smooth(theta):
        return ((z - theta) / 0.4 + 0.5).clamp(0, 1).sum(0)

    th = sae.threshold.detach().double()
    h = 1e-4
    fd = (smooth(th + h) - smooth(th - h)) / (2 * h)
    torch.testing.assert_close(sae.threshold.grad.double(), fd, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_matryoshka_loss_is_the_mean_of_prefix_fvus():
    torch.manual_seed(0)
    sae = MLSAE(16, 64, 4, architecture="matryoshka",
                arch_options={"matryoshka_widths": "8,32"})
    assert sae.arch.prefixes(sae) == [8, 32, 64]
    L, T = 3, 20
    x = torch.randn(L, T, 16) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    out = loss(sae, x, None)
    code = sae.forward_train(x.reshape(-1, 16), n_layers=L).code
    dense = code.dense(64).double()
    xd = x.double()
    fvus = []
    for m in (8, 32, 64):
        keep = dense.clone()
        keep[:, m:] = 0
        y = keep @ sae.W_dec.double() + sae.b_dec.double()
        x_hat = sae.postprocess(y, code.mu.double(), code.std.double()).view(L, T, 16)
        err = (x_hat - xd).square().sum((1, 2))
        var = (xd - xd.mean(1, keepdim=True)).square().sum((1, 2))
        fvus.append((err / var).mean())
    assert abs(float(out.loss.detach()) - float(sum(fvus).detach() / 3)) < 1e-5
    assert abs(float(out.err.sum() / 1) - float(
        sum((sae.postprocess(dense @ sae.W_dec.double() + sae.b_dec.double(), code.mu.double(),
                             code.std.double()).view(L, T, 16) - xd).square().sum((1, 2))))
               ) < 1e-3 * float(out.err.sum())


def test_config_option_lists_match_the_registry():
    assert set(ARCH_OPTIONS) == set(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        assert set(ARCH_OPTIONS[name]) == set(cls.options), name


# ---- training, checkpoints, resume, sweeps ------------------------------------------------
def small_cfg(text_file, out, arch: str, **train_kw):
    t = dict(model="tiny", layers="all", tokens=4 * 32 * 12, batch_size=4, log_every=2,
             save_every=5, eval_tokens=256, dead_tokens=300)
    t.update(train_kw)
    return RunConfig(SAEConfig(expansion_factor=4, k=8, arch=arch),
                     DataConfig(dataset=str(text_file), ctx_len=32),
                     TrainConfig(out=str(out), **t))


def _tensors(folder):
    out = load_file(str(folder / "model.safetensors"))
    out.update({f"opt.{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()})
    out.update(load_file(str(folder / "state.safetensors")))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_saves_loads_and_resumes_bit_identically(
        arch, tiny_lm, text_file, tmp_path, topk_path):
    full = train(small_cfg(text_file, tmp_path / "full", arch), lm=tiny_lm, progress=False)
    assert full["finished"]
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["architecture"] == f"mlsae_{arch}"
    sae = MLSAE.from_pretrained(tmp_path / "full")
    assert sae.architecture == arch
    names = set(load_file(str(tmp_path / "full" / "model.safetensors")))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        set() if arch == "topk" else {"threshold"})
    if arch != "topk":
        assert float(sae.threshold.max()) > 0
    # the loaded SAE encodes as the trained one
    x = torch.randn(10, 32)
    a, b = sae.encode(x), full["trainer"].sae.encode(x)
    assert torch.equal(a.acts, b.acts) and torch.equal(a.idx, b.idx)
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").open()]
    assert rows[-1]["loss"] < rows[0]["loss"]

    def sigint_at_7(trainer):
        if trainer.step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    part = train(small_cfg(text_file, tmp_path / "part", arch), lm=tiny_lm,
                 on_step=sigint_at_7, progress=False)
    assert not part["finished"]
    assert train(resume=tmp_path / "part", lm=tiny_lm, progress=False)["finished"]
    A, B = _tensors(tmp_path / "full" / "checkpoint"), _tensors(tmp_path / "part" / "checkpoint")
    assert A.keys() == B.keys()
    for name in A:
        assert torch.equal(A[name], B[name]), (arch, name)


def test_sweep_over_architectures_shares_one_lm_pass(tiny_lm, text_file, tmp_path):
    res = train(small_cfg(text_file, tmp_path / "sw", "topk", tokens=4 * 32 * 4),
                sweep="arch=topk,batchtopk k=4", lm=tiny_lm, progress=False)
    assert res["finished"]
    for name, arch in (("topk-k4", "topk"), ("batchtopk-k4", "batchtopk")):
        sae = MLSAE.from_pretrained(tmp_path / "sw" / name)
        assert sae.architecture == arch and sae.k == 4


def test_bad_arch_is_one_line(text_file, tmp_path):
    with pytest.raises(UserError, match="arch 'relu': choose one of topk, batchtopk"):
        train(small_cfg(text_file, tmp_path / "x", "relu"), progress=False)


def test_release_topk_run_loads_and_topk_numbers_are_unchanged(tiny_lm, text_file, tmp_path,
                                                               topk_path):
    """A run folder written by the last release (before architectures existed) loads as
    `topk`, and retraining its config with today's code on the same top-k path gives
    bit-identical tensors."""
    release = RELEASE_RUNS[topk_path]
    old = MLSAE.from_pretrained(release)
    assert old.architecture == "topk" and old.tensor_names == ("W_enc", "b_enc", "W_dec",
                                                               "b_dec")
    assert "arch" not in json.loads((release / "config.json").read_text())["run"]["sae"]
    copy = tmp_path / "old"
    shutil.copytree(release, copy)
    cfg = RunConfig.from_dict(json.loads((copy / "checkpoint" / "state.json").read_text())
                              ["config"])
    assert cfg.sae.arch == "topk"
    cfg.data.dataset = str(text_file)  # the same 40,000 characters, another path
    cfg.train.out = str(tmp_path / "again")
    train(cfg, lm=tiny_lm, progress=False)
    A = _tensors(release / "checkpoint")
    B = _tensors(tmp_path / "again" / "checkpoint")
    assert A.keys() == B.keys()
    for name in A:
        assert torch.equal(A[name], B[name]), name
    old_rows = (release / "metrics.jsonl").read_text().splitlines()
    new_rows = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    keep = ("step", "loss", "fvu", "l0", "auxk_loss", "dead_fraction")
    assert [{k: json.loads(r)[k] for k in keep} for r in old_rows] == \
        [{k: json.loads(r)[k] for k in keep} for r in new_rows]


def test_weak_firings_match_a_loop():
    from mlsae.analysis.layer_dist import weak_firings

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (50, 4), generator=g)
    acts = torch.rand(50, 4, generator=g) ** 4 * (torch.rand(50, 4, generator=g) > 0.3)
    got = weak_firings(idx, acts, 7)
    pairs = [(int(i), float(a)) for i, a in zip(idx.flatten(), acts.flatten()) if a > 0]
    mean = {f: sum(a for j, a in pairs if j == f) / max(1, sum(1 for j, _ in pairs if j == f))
            for f in range(7)}
    for frac, key in ((0.01, "frac_weak_1pct"), (0.05, "frac_weak_5pct")):
        want = sum(a < frac * mean[f] for f, a in pairs) / len(pairs)
        assert abs(got[key] - want) < 1e-12 and want > 0


def test_token_topk_level_is_the_batch_threshold_of_its_budget():
    """token-topk's single-vector threshold statistic keeps as many entries over the batch as
    the per-token budgets: the k x N-th largest pre-activation (dense brute force)."""
    sae = random_sae("token-topk", k=3)
    L, T = 4, 12
    x = torch.randn(L * T, 16, generator=torch.Generator().manual_seed(5))
    out = sae.forward_train(x, n_layers=L)
    z = dense_pre(sae, x)
    want = z.flatten().topk(3 * L * T).values[-1]
    assert ((z > want).sum(1) > 6).any()  # some rows' share exceeds their top-2k candidates
    assert abs(float(out.level) - float(want)) < 1e-5
    kept = out.code.acts[out.code.acts > 0]
    assert float(kept.min()) <= float(out.level)  # the lowest token's threshold is below


def test_pareto_grid_csv_figure_and_report(tiny_lm, text_file, tmp_path):
    """A small grid with baselines from one LM pass: pareto.csv holds each run's eval.json
    numbers, the curves are the means the docstring states, and the report shows them."""
    import csv

    from mlsae.analysis.report import report
    from mlsae.pareto import ParetoConfig, pareto

    base = RunConfig(SAEConfig(expansion_factor=4), DataConfig(dataset=str(text_file),
                                                                ctx_len=32),
                     TrainConfig(model="tiny", tokens=4 * 32 * 4, batch_size=4,
                                 dead_tokens=300))
    pc = ParetoConfig(out=str(tmp_path / "p"), archs="topk,batchtopk,jumprelu", ks="4,8",
                      baseline_layers="1", score_tokens=256)
    res = pareto(base, pc, progress=False, lm=tiny_lm)
    rows = list(csv.DictReader((tmp_path / "p" / "pareto.csv").open()))
    points = {r["point"] for r in rows}
    assert points == {"topk-k4", "topk-k8", "batchtopk-k4", "batchtopk-k8", "jumprelu-k4",
                      "jumprelu-k8"}
    for r in rows:
        folder = tmp_path / "p" / r["point"] if r["kind"] == "mlsae" else \
            tmp_path / "p" / "baselines" / r["point"] / f"layer_{r['layer']}"
        ev = json.loads((folder / "eval.json").read_text())
        i = ev["layers"].index(int(r["layer"]))
        for key in ("l0", "fvu", "dce"):
            assert float(r[key]) == pytest.approx(ev["per_layer"][key][i], rel=1e-12)
        assert int(r["params"]) == 2 * 128 * 32 + 128 + 32
        assert MLSAE.from_pretrained(folder).architecture == r["arch"]
    # topk's L0 is its k; curves: means over the baseline layer (1) of the MLSAE rows
    topk4 = [r for r in rows if r["point"] == "topk-k4" and r["kind"] == "mlsae"]
    assert {float(r["l0"]) for r in topk4} == {4.0} and len(topk4) == 4
    mlsae_l1 = [r for r in topk4 if r["layer"] == "1"]
    assert res["curves"]["topk"]["mlsae"][0] == pytest.approx(
        [float(mlsae_l1[0][m]) for m in ("l0", "fvu", "dce")])
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 10_000
    page = report(tmp_path / "p" / "topk-k8").read_text()
    assert "Architectures at matched L0" in page and "pareto.png" in page


@pytest.mark.parametrize("args, msg", [
    (["--archs", "topk,relu"], "--archs 'topk,relu': choose from topk, batchtopk"),
    (["--ks", "8,x"], "--ks '8,x': use comma-separated numbers"),
])
def test_pareto_bad_input_is_one_line(args, msg, tiny_model_dir, tmp_path, capsys):
    from mlsae.cli import main

    code = main(["pareto", "--model", str(tiny_model_dir), "--out", str(tmp_path / "p"),
                 *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and msg in err and len(err.splitlines()) == 1


def test_unknown_architecture_in_a_checkpoint_is_one_line(tmp_path):
    sae = random_sae("batchtopk")
    sae.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["architecture"] = "mlsae_gated"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="architecture 'mlsae_gated' is unknown to this mlsae"):
        MLSAE.from_pretrained(tmp_path / "c")
