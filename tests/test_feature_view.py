"""The feature view in the explorer's latent view (API and headless Chromium): logit effect,
activation density per layer, top examples per layer with their layer; and in the report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.analysis.analyze import analyze
from mlsae.analysis.examples import collect_examples
from mlsae.analysis.features import features, logit_effects, read_latent
from mlsae.analysis.top_examples import query_examples
from mlsae.options import TextOptions
from mlsae.sae import MLSAE
from mlsae.server.app import create_app
from mlsae.server.runner import background
from mlsae.train import RunConfig, train

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def run(tiny_lm, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fview") / "run"
    train(RunConfig(SAEConfig(expansion_factor=4, k=8),
                    DataConfig(dataset=str(text_file), ctx_len=32),
                    TrainConfig(out=str(out), model="tiny", layers="all", tokens=4 * 32 * 6,
                                batch_size=4, eval_tokens=0, dead_tokens=300)),
          lm=tiny_lm, progress=False)
    opts = TextOptions(tokens=512, batch_size=4)
    analyze(out, opts, lm=tiny_lm, progress=False)
    collect_examples(out, opts, top=4, window=3, lm=tiny_lm, progress=False)
    features(out, opts, lm=tiny_lm, progress=False)
    return out


@pytest.fixture(scope="module")
def app(run, tiny_lm):
    return create_app(run, lm=tiny_lm, max_prompt_tokens=40)


def busy_latent(run: Path) -> int:
    dens = [sum(map(sum, read_latent(run, f)["density"])) for f in range(128)]
    return max(range(128), key=dens.__getitem__)


def test_latent_api_feature_view(app, run, tiny_lm):
    client = TestClient(app)
    latent = busy_latent(run)
    res = client.get(f"/api/latents/{latent}").json()
    sae = MLSAE.from_pretrained(run)
    hi_v, hi_i, lo_v, lo_i = logit_effects(tiny_lm, sae.W_dec.detach()[latent:latent + 1])
    le = res["logit_effect"]
    assert le["available"] and [t["id"] for t in le["top"]] == hi_i[0].tolist()
    assert [t["value"] for t in le["top"]] == pytest.approx(hi_v[0].tolist(), rel=1e-5)
    assert [t["id"] for t in le["bottom"]] == lo_i[0].tolist()
    dens = res["density"]
    assert dens["available"] and dens["layers"] == [0, 1, 2, 3]
    assert dens["counts"] == read_latent(run, latent)["density"]
    assert len(dens["bin_edges"]) == len(dens["counts"][0]) + 1
    groups = res["examples_by_layer"]
    assert [g["layer"] for g in groups] == [c["layer"] for c in res["examples"]["layers"]]
    db = run / "analysis" / "examples.sqlite"
    for g in groups:
        stored = query_examples(db, latent, g["layer"])[:3]
        assert [e["activation"] for e in g["examples"]] == pytest.approx(
            [r["activation"] for r in stored])
    bare = run.parent / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("features*"))
    res = TestClient(create_app(bare, lm=tiny_lm)).get(f"/api/latents/{latent}").json()
    assert not res["density"]["available"]
    assert f"mlsae features {bare}" in res["density"]["hint"]
    assert res["logit_effect"]["available"]  # computed from the LM: always there


def test_report_latent_cards_show_the_feature_view(run):
    from mlsae.analysis.report import report

    html = report(run).read_text()
    assert "Logit effect" in html and "promotes" in html
    assert "Activation density per layer" in html
    assert "Top examples per layer" in html


def test_browser_latent_view(app, run):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    expect = sync_api.expect
    expect.set_options(timeout=20_000)
    latent = busy_latent(run)
    with background(app) as url, sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as e:  # no usable browser on this machine
            pytest.skip(f"headless Chromium cannot be launched: {e}")
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.click("#tabs button[data-view=latent]")
            page.fill("#latent-input", str(latent))
            page.click("#latent-form button")
            expect(page.locator("#latent-title")).to_have_text(f"Latent {latent}")
            expect(page.locator("#latent-logits table")).to_have_count(2)
            expect(page.locator("#latent-logits table").first.locator("tr")).to_have_count(10)
            expect(page.locator("#latent-density .density-row")).to_have_count(4)
            expect(page.locator("#latent-density .density-row").first.locator(
                ".density-bin")).to_have_count(20)
            meta = page.locator("#latent-by-layer .example .meta")
            expect(meta.first).to_contain_text("layer ")
            assert not errors
        finally:
            browser.close()
    torch.manual_seed(0)
