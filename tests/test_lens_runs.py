"""Lens runs (`mlsae train --lens`) in `mlsae eval`, `mlsae serve` and `mlsae compare`
(issue 14), checked against an independent re-statement: the translator applied with an
explicit float64 matmul, the SAE forward, the inverse by `torch.linalg.solve`, the FVU of
SPEC §2, CE by a forward hook that splices block l's output. The lens is a small NON-identity
one (random translator weights and biases), the SAE a random one: what is checked is where
and how the lens is applied, not how good the dictionary is. Also: the explorer's prompt view
marks tokens excluded by the run's `exclude_outliers` rule, and `export` / `baselines` refuse
a lens run with one line."""

import csv
import json

import pytest
import torch
from fastapi.testclient import TestClient

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.cli import main
from mlsae.compare import compare
from mlsae.data import include_mask
from mlsae.evaluate import evaluate
from mlsae.lens import TunedLens
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.server.app import create_app
from mlsae.train import RunConfig

CTX, D = 32, 32
LAYERS = [0, 1, 2]  # hidden_states[l + 1] is block l's output (the last one is normed in HF)
TOKENS = 256
PROMPT = "The quick brown fox jumps"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def opts(**kw):
    return TextOptions(**dict(dict(tokens=TOKENS, batch_size=4), **kw))


def random_lens(path, seed: int = 0) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens(LAYERS, D, {"model": "tiny"})
    with torch.no_grad():
        lens.weight.copy_(0.4 * torch.randn(len(LAYERS), D, D, generator=g) / D ** 0.5)
        lens.bias.copy_(0.5 * torch.randn(len(LAYERS), D, generator=g))
    lens.save(path)
    return lens


def make_run(out, model_dir, text_file, lens_dir=None, exclude_outliers=0.0, layers=LAYERS,
             seed=1, n_latents=128, k=8) -> MLSAE:
    """A run folder as training writes it (config.json with `run`, model.safetensors and,
    for a lens run, its copy of the lens in RUN/lens/), with a random SAE."""
    cfg = RunConfig(SAEConfig(expansion_factor=n_latents // D, k=k),
                    DataConfig(dataset=str(text_file), ctx_len=CTX,
                               exclude_outliers=exclude_outliers),
                    TrainConfig(model=str(model_dir), layers=",".join(map(str, layers)),
                                lens=None if lens_dir is None else str(lens_dir),
                                out=str(out)))
    g = torch.Generator().manual_seed(seed)
    sae = MLSAE(D, n_latents, k, config={"model": str(model_dir), "layers": list(layers),
                                        "run": cfg.to_dict()})
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(n_latents, generator=g))
    sae.save_pretrained(out)
    if lens_dir is not None:
        random_lens(out / "lens", seed=0)  # the run's copy: the same lens
    return sae


@pytest.fixture(scope="module")
def lens_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lens") / "lens"
    random_lens(out, seed=0)
    return out


@pytest.fixture(scope="module")
def lens_run(lens_dir, tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lensrun") / "run"
    make_run(out, tiny_model_dir, text_file, lens_dir)
    return out


# ---- the independent re-statement ------------------------------------------------------------
def hand_lens(lens_dir) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{block: (W, b)} float64, read from the lens file itself."""
    from safetensors.torch import load_file

    t = load_file(str(lens_dir / "lens.safetensors"))
    return {v: (t[f"translators.{v}.weight"].double(), t[f"translators.{v}.bias"].double())
            for v in LAYERS}


def translate(x: torch.Tensor, wb) -> torch.Tensor:
    w, b = wb
    x = x.double()
    return x + x @ w.T + b


def untranslate(y: torch.Tensor, wb) -> torch.Tensor:
    """h (I + W^T) = y - b, i.e. (I + W) h^T = (y - b)^T."""
    w, b = wb
    return torch.linalg.solve(torch.eye(D, dtype=torch.float64) + w, (y.double() - b).T).T


@torch.no_grad()
def hand_recon(sae, x: torch.Tensor, wb) -> torch.Tensor:
    """x -> translate -> SAE -> exact inverse, float64."""
    return untranslate(sae(translate(x, wb).float()).x_hat, wb)


@torch.no_grad()
def hooked_logp(lm, ids, replace: dict) -> torch.Tensor:
    """float64 log-probs of a plain forward where block l's output is replaced by
    `replace[l](output)` (free-running: later blocks see the replaced stream)."""
    def hook(_m, _a, out, layer):
        h = out[0] if isinstance(out, tuple) else out
        h = replace[layer](h.clone())
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handles = [lm.blocks[v].register_forward_hook(lambda m, a, o, v=v: hook(m, a, o, v))
               for v in replace]
    try:
        return lm.model(ids).logits.double().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()


def ce_of(logp, ids, pos) -> float:
    return -logp[:, :-1][pos].gather(1, ids[:, 1:][pos][:, None]).mean().item()


# ---- eval ------------------------------------------------------------------------------------
def test_eval_fvu_and_splice_of_a_lens_run_by_hand(lens_run, lens_dir, tiny_lm, tmp_path):
    res = evaluate(lens_run, opts(), out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    assert res["lens"] == str(lens_dir) and res["layers"] == LAYERS
    sae = MLSAE.from_pretrained(lens_run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts())
    ids = torch.cat(batch_list)
    mask = include_mask(ids, tiny_lm.special_ids, data_cfg)
    pos = mask[:, :-1]
    wbs = hand_lens(lens_dir)
    with torch.no_grad():
        hs = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    clean = ce_of(hooked_logp(tiny_lm, ids, {}), ids, pos)
    assert res["included_tokens"] == int(mask.sum()) and res["ce_positions"] == int(pos.sum())
    for i, layer in enumerate(LAYERS):
        x = hs[layer + 1][mask].double()
        x_hat = hand_recon(sae, x, wbs[layer])
        fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert res["per_layer"]["fvu"][i] == pytest.approx(fvu.item(), rel=1e-4)
        assert res["per_layer"]["mse"][i] == pytest.approx(((x_hat - x) ** 2).mean().item(),
                                                           rel=1e-4)
        with torch.no_grad():
            l0 = (sae.encode(translate(x, wbs[layer]).float()).acts > 0).sum(-1).double()
        assert res["per_layer"]["l0"][i] == pytest.approx(l0.mean().item(), rel=1e-9)
        # the lens matters: the SAE on the untranslated x scores something else
        with torch.no_grad():
            raw = sae(x.float()).x_hat.double()
        raw_fvu = ((raw - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert abs(raw_fvu.item() - fvu.item()) > 1e-3 * fvu.item()

        # CE_recon: block `layer`'s output replaced at the included positions by x_hat
        def splice(h, layer=layer, x_hat=x_hat):
            h[mask] = x_hat.to(h.dtype)
            return h

        recon = ce_of(hooked_logp(tiny_lm, ids, {layer: splice}), ids, pos)
        assert res["per_layer"]["ce_recon"][i] == pytest.approx(recon, rel=1e-4)
        assert res["per_layer"]["dce"][i] == pytest.approx(recon - clean, abs=1e-4)

        # the zero ablation is of x itself, lens or not
        def zero(h):
            h[mask] = 0
            return h

        z = ce_of(hooked_logp(tiny_lm, ids, {layer: zero}), ids, pos)
        assert res["per_layer"]["ce_zero"][i] == pytest.approx(z, rel=1e-4)


def test_eval_replacement_of_a_lens_run_by_hand(lens_run, lens_dir, tiny_lm, tmp_path):
    """Free-running multi-layer replacement: each replaced block's output (what arrives from
    the spliced stream) -> translate -> SAE -> inverse, by hooks."""
    res = evaluate(lens_run, opts(tokens=128), out=tmp_path / "e.json", lm=tiny_lm,
                   progress=False, layers=[1], replace="all")
    rep = res["replacement"]
    assert rep["layers"] == LAYERS and [p["n_layers"] for p in rep["curve"]] == [1, 2, 3]
    sae = MLSAE.from_pretrained(lens_run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts(tokens=128))
    ids = torch.cat(batch_list)
    mask = include_mask(ids, tiny_lm.special_ids, data_cfg)
    pos = mask[:, :-1]
    wbs = hand_lens(lens_dir)

    def replace(h, layer):
        h[mask] = hand_recon(sae, h[mask], wbs[layer]).to(h.dtype)
        return h

    clean = hooked_logp(tiny_lm, ids, {})
    for pt in rep["curve"]:
        logq = hooked_logp(tiny_lm, ids, {v: (lambda h, v=v: replace(h, v))
                                          for v in LAYERS[:pt["n_layers"]]})
        assert pt["ce"] == pytest.approx(ce_of(logq, ids, pos), rel=1e-4)
        p, q = clean[:, :-1][pos], logq[:, :-1][pos]
        assert pt["kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(),
                                         rel=1e-3, abs=1e-6)
    # one layer replaced is the single-layer splice
    assert rep["curve"][0]["ce"] == pytest.approx(
        evaluate(lens_run, opts(tokens=128), out=tmp_path / "f.json", lm=tiny_lm,
                 progress=False, layers=[0])["per_layer"]["ce_recon"][0], rel=1e-6)


def test_cli_eval_lens_run(lens_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(lens_run), "--tokens", "128", "--batch-size", "4",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lens"] and len(res["per_layer"]["fvu"]) == 3
    assert "wrote" in capsys.readouterr().out


# ---- the explorer ----------------------------------------------------------------------------
def prompt_ids(lm, text=PROMPT):
    return torch.tensor([[lm.eos_id, *lm.tokenizer(text, add_special_tokens=False)
                          ["input_ids"]]])


def test_explorer_encodes_translated_vectors(lens_run, lens_dir, tiny_lm):
    client = TestClient(create_app(lens_run, lm=tiny_lm, max_prompt_tokens=64))
    info = client.get("/api/info").json()
    assert info["lens"] == str(lens_dir) and "lens" in info["steering"]
    sae = MLSAE.from_pretrained(lens_run)
    wbs = hand_lens(lens_dir)
    ids = prompt_ids(tiny_lm)
    with torch.no_grad():
        hs = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    for position in (1, 3, ids.shape[1] - 1):
        r = client.post("/api/token", json={"prompt": PROMPT, "position": position,
                                            "top": sae.k})
        assert r.status_code == 200, r.text
        got = r.json()["layers"]
        for i, layer in enumerate(LAYERS):
            with torch.no_grad():
                code = sae.encode(translate(hs[layer + 1][0, position], wbs[layer])[None]
                                  .float())
            acts, order = code.acts[0].sort(descending=True)
            want = [(int(j), float(a)) for j, a in zip(code.idx[0][order], acts) if a > 0]
            have = [(v["latent"], v["activation"]) for v in got[i]["latents"]]
            assert got[i]["layer"] == layer
            assert [j for j, _ in have] == [j for j, _ in want]
            assert [a for _, a in have] == pytest.approx([a for _, a in want], rel=1e-4)
    # the logits splice at a layer goes through the lens too
    layer = 1
    r = client.post("/api/logits", json={"prompt": PROMPT, "layer": layer, "top": 5})
    assert r.status_code == 200, r.text
    mask = include_mask(ids, tiny_lm.special_ids, DataConfig(ctx_len=CTX))

    def splice(h):
        h[mask] = hand_recon(sae, h[mask], wbs[layer]).to(h.dtype)
        return h

    clean = hooked_logp(tiny_lm, ids, {})[0, -1]
    logq = hooked_logp(tiny_lm, ids, {layer: splice})[0, -1]
    kl = (clean.exp() * (clean - logq)).sum().item()
    assert r.json()["spliced"]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_explorer_steers_in_the_translated_space(lens_run, lens_dir, tiny_lm):
    """h' = lens(x) gains factor * (std(h') + eps) * W_dec[f] at the included positions (the
    change of the SAE's output when latent f grows by factor), then x = the exact inverse."""
    client = TestClient(create_app(lens_run, lm=tiny_lm, max_prompt_tokens=64))
    sae = MLSAE.from_pretrained(lens_run)
    wb = hand_lens(lens_dir)[1]
    ids, layer, latent, factor = prompt_ids(tiny_lm), 1, 5, 4.0
    mask = include_mask(ids, tiny_lm.special_ids, DataConfig(ctx_len=CTX))
    with torch.no_grad():
        x = tiny_lm.model(ids, output_hidden_states=True).hidden_states[layer + 1][0].double()
    y = translate(x, wb)
    std = y.std(dim=-1, unbiased=False, keepdim=True)
    steered = untranslate(y + factor * (std + sae.eps) * sae.W_dec[latent].detach().double(), wb)
    new = torch.where(mask[0, :, None], steered, x)

    def steer(h):
        return new[None].to(h.dtype)

    p = hooked_logp(tiny_lm, ids, {layer: steer})[0, -1].exp()
    res = client.post("/api/steer", json={"prompt": PROMPT, "latent": latent, "layer": layer,
                                          "factor": factor, "top": 5})
    assert res.status_code == 200, res.text
    res = res.json()
    assert [t["id"] for t in res["steered"]["top"]] == p.topk(5).indices.tolist()
    assert [t["prob"] for t in res["steered"]["top"]] == pytest.approx(
        p.topk(5).values.tolist(), abs=1e-5)
    ratio = ((new - x).norm(dim=-1) / x.norm(dim=-1))[mask[0]].mean().item()
    assert res["relative_norm"] == pytest.approx(ratio, rel=1e-4)


def test_prompt_view_marks_outliers_excluded(lens_dir, tiny_model_dir, tiny_lm, text_file,
                                             tmp_path):
    """With the run's exclude_outliers factor f, a token whose norm at any of the SAE's layers
    exceeds f x that layer's median over the prompt's included tokens is shown excluded and
    left out of the heatmap (re-stated here from hidden_states; f chosen from the prompt's
    own norms so that some token is excluded and some is not)."""
    ids = prompt_ids(tiny_lm)
    base = include_mask(ids, tiny_lm.special_ids, DataConfig(ctx_len=CTX))[0]
    with torch.no_grad():
        hs = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    norms = torch.stack([hs[v + 1][0].double().norm(dim=-1) for v in LAYERS])  # [layer, T]
    inc = norms[:, base]
    med = inc.sort(dim=1).values[:, (inc.shape[1] - 1) // 2]  # the lower median, as torch's
    ratio = inc / med[:, None]
    factor = (1 + ratio.max().item()) / 2
    drop = (ratio > factor).any(0)
    want = base.clone()
    want[base.nonzero()[:, 0][drop]] = False
    assert 0 < int(drop.sum()) < int(base.sum())  # the case is non-trivial
    run = tmp_path / "run"
    make_run(run, tiny_model_dir, text_file, lens_dir, exclude_outliers=factor)
    client = TestClient(create_app(run, lm=tiny_lm, max_prompt_tokens=64))
    assert client.get("/api/info").json()["exclude_outliers"] == pytest.approx(factor)
    res = client.post("/api/prompt", json={"prompt": PROMPT, "top_latents": 16}).json()
    assert [t["included"] for t in res["tokens"]] == want.tolist()
    # the heatmap's totals: activations summed over the included positions only
    sae = MLSAE.from_pretrained(run)
    wbs = hand_lens(lens_dir)
    for i, layer in enumerate(LAYERS):
        with torch.no_grad():
            code = sae.encode(translate(hs[layer + 1][0][want], wbs[layer]).float())
        dense = torch.zeros(sae.n_latents, dtype=torch.float64)
        dense.index_add_(0, code.idx.reshape(-1), code.acts.reshape(-1).double())
        assert res["heatmap"]["totals"][i] == pytest.approx(
            dense[res["heatmap"]["latents"]].tolist(), rel=1e-4, abs=1e-5)
    excluded_pos = int((base & ~want).nonzero()[0, 0])
    tok = client.post("/api/token", json={"prompt": PROMPT, "position": excluded_pos,
                                          "top": 4}).json()
    assert tok["token"]["included"] is False


# ---- compare ---------------------------------------------------------------------------------
def test_compare_lens_run_against_baselines(lens_run, lens_dir, tiny_model_dir, tiny_lm,
                                            text_file, tmp_path):
    """The MLSAE side goes through its lens (its FVU is eval's, checked by hand above), the
    single-layer baselines (plain runs) do not; the replacement curves likewise."""
    root = tmp_path / "baselines"
    for layer in LAYERS:
        make_run(root / f"layer_{layer}", tiny_model_dir, text_file, layers=[layer],
                 seed=10 + layer, n_latents=64, k=4)
    out = tmp_path / "cmp"
    res = compare(lens_run, root, out_dir=out, opts=opts(tokens=128), lm=tiny_lm,
                  progress=False, replace="all")
    mine = evaluate(lens_run, opts(tokens=128), out=tmp_path / "m.json", lm=tiny_lm,
                    progress=False, replace="all")
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [int(r["layer"]) for r in rows] == LAYERS
    for i, row in enumerate(rows):
        assert float(row["mlsae_fvu"]) == pytest.approx(mine["per_layer"]["fvu"][i], rel=1e-6)
        base = json.loads((root / f"layer_{LAYERS[i]}" / "eval.json").read_text())
        assert "lens" not in base
        assert float(row["baseline_fvu"]) == pytest.approx(base["per_layer"]["fvu"][0])
    rep = res["replacement"]["data"]
    assert rep["layers"] == LAYERS
    assert [p["ce"] for p in rep["mlsae"]["curve"]] == pytest.approx(
        [p["ce"] for p in mine["replacement"]["curve"]], rel=1e-6)
    # the baselines' curve: each layer by its own plain SAE, no lens (by hooks)
    saes = {v: MLSAE.from_pretrained(root / f"layer_{v}") for v in LAYERS}
    sae = MLSAE.from_pretrained(lens_run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts(tokens=128))
    ids = torch.cat(batch_list)
    mask = include_mask(ids, tiny_lm.special_ids, data_cfg)

    def plain(h, v):
        with torch.no_grad():
            h[mask] = saes[v](h[mask].float()).x_hat.to(h.dtype)
        return h

    logq = hooked_logp(tiny_lm, ids, {v: (lambda h, v=v: plain(h, v)) for v in LAYERS})
    assert rep["baseline"]["ce_replaced"] == pytest.approx(ce_of(logq, ids, mask[:, :-1]),
                                                           rel=1e-4)


def test_imported_baselines_never_inherit_the_lens(lens_run, tiny_model_dir, text_file,
                                                   tmp_path):
    from mlsae.compare import imported_baselines

    src = tmp_path / "plain"
    make_run(src, tiny_model_dir, text_file, layers=[1], n_latents=64, k=4)
    exported = tmp_path / "sl"
    assert main(["export", str(src), "--out", str(exported)]) == 0
    folders = imported_baselines({1: exported / "layer_1"}, MLSAE.from_pretrained(lens_run),
                                 tmp_path / "imported")
    cfg = json.loads((folders[1] / "config.json").read_text())
    assert cfg["run"]["data"]["dataset"] == str(text_file)  # the MLSAE's data settings ...
    assert cfg["run"]["train"]["lens"] is None  # ... but not its lens
    assert MLSAE.from_pretrained(lens_run).config["run"]["train"]["lens"]  # left unchanged


# ---- commands that still refuse --------------------------------------------------------------
def test_export_and_baselines_refuse_a_lens_run(lens_run, tmp_path, capsys):
    assert main(["export", str(lens_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "trained with --lens" in err and "SAELens has no tuned lens" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main(["baselines", str(lens_run), "--tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "trained with --lens: this command does not apply the lens" in err
