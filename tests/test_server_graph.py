"""The explorer's graph view (issue 22): /api/graph against `mlsae graph`'s own session,
/api/intervene against a by-hand splice, bad input, and the view in headless Chromium (build,
hover, pin, intervene). Reuses test_server's tiny trained run (with analysis files)."""

from __future__ import annotations

import pytest
import torch
from test_server import PROMPT, _launch, app, client, ok, runs  # noqa: F401

from mlsae.circuits.command import GraphConfig, GraphSession
from mlsae.server.runner import background

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def graph(client):  # noqa: F811
    return ok(client.post("/api/graph", json={"prompt": PROMPT, "mode": "frozen-mlp"}))


def test_graph_endpoint_is_the_command_graph(graph, runs, tiny_lm):  # noqa: F811
    sae = app_sae(runs)
    session = GraphSession(runs[0], GraphConfig(prompt=PROMPT, mode="frozen-mlp"), lm=tiny_lm,
                           sae=sae)
    _, data = session.build(PROMPT, causal=False)
    assert [n["node_id"] for n in graph["nodes"]] == [n["node_id"] for n in data["nodes"]]
    assert [ln["weight"] for ln in graph["links"]] == pytest.approx(
        [ln["weight"] for ln in data["links"]], rel=1e-5, abs=1e-6)
    m = graph["metadata"]["mlsae"]
    assert m["causal"] is None and m["mode"] == "frozen-mlp"
    assert m["checks"]["additivity"]["max_rel_error"] < 1e-5
    logits = tiny_lm.logits(prompt_ids(tiny_lm))[0, -1]
    assert m["target"]["token"] == int(logits.argmax())
    kinds = {n["mlsae"]["kind"] for n in graph["nodes"]}
    assert {"latent", "embedding", "logit"} <= kinds


def app_sae(runs):  # noqa: F811
    from mlsae.sae import MLSAE

    return MLSAE.from_pretrained(runs[0])


def prompt_ids(tiny_lm, text: str = PROMPT) -> torch.Tensor:
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tiny_lm.eos_id, *ids]])


def test_intervene_matches_a_by_hand_splice(client, graph, runs, tiny_lm):  # noqa: F811
    lat = [n for n in graph["nodes"] if n["mlsae"]["kind"] == "latent"]
    node = max(lat, key=lambda n: n["mlsae"]["influence"])
    latent, layer = node["feature"], int(node["layer"])
    res = ok(client.post("/api/intervene", json={"prompt": PROMPT, "top": 5, "edits": [
        {"latent": latent, "layer": layer, "scale": 0.0}]}))
    # by hand: resid_post of `layer` with the latent's activation zeroed in the SAE's
    # reconstruction at the included positions (1..T), the error term added back
    sae = app_sae(runs)
    ids = prompt_ids(tiny_lm)
    x = tiny_lm.resid_post(ids, [layer])[0, 0]
    code = sae.encode(x[1:])
    dense = code.dense(sae.n_latents)
    edited = dense.clone()
    edited[:, latent] = 0
    new = x.clone()
    new[1:] = x[1:] + sae.decode_dense(edited, code) - sae.decode_dense(dense, code)
    p = tiny_lm.logits_from(ids, layer, new[None])[0, -1].float().softmax(-1)
    top = p.topk(5)
    assert [t["id"] for t in res["top"]] == top.indices.tolist()
    assert [t["prob"] for t in res["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert res["kl"] > 0


@pytest.mark.parametrize("path,body,message", [
    ("/api/graph", {"prompt": PROMPT, "target": "ab"}, "is 2 tokens, not one"),
    ("/api/graph", {"prompt": PROMPT, "mode": "exact"}, "mode 'exact': choose one of"),
    ("/api/graph", {"prompt": PROMPT, "node_threshold": 2}, "node_threshold"),
    ("/api/intervene", {"prompt": PROMPT, "edits": [{"latent": 0, "layer": 9, "scale": 0}]},
     "layer 9 is not a layer of the SAE"),
    ("/api/intervene", {"prompt": PROMPT, "edits": [{"latent": 10**6, "layer": 0,
                                                     "scale": 0}]}, "does not exist"),
    ("/api/intervene", {"prompt": PROMPT, "edits": []}, "edits"),
])
def test_graph_bad_input_is_422(client, path, body, message):  # noqa: F811
    r = client.post(path, json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_browser_graph_view(app, client, graph, tmp_path):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    expect = sync_api.expect
    expect.set_options(timeout=30_000)
    with background(app) as url, sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#run-info")).to_contain_text("tiny-llama")
            page.fill("#prompt", PROMPT)
            page.click("#tabs button[data-view=graph]")
            page.select_option("#graph-mode", "frozen-mlp")
            page.click("#graph-build")
            circles = page.locator("#graph-svg circle.gnode")
            expect(circles).to_have_count(len(graph["nodes"]))
            links = min(len(graph["links"]), 3000)
            expect(page.locator("#graph-svg line.glink")).to_have_count(links)
            expect(page.locator("#graph-summary")).to_contain_text(
                f"{len(graph['nodes'])} nodes")
            # hover a latent: its data from the latent views (layer shares, examples)
            lat = [n for n in graph["nodes"] if n["mlsae"]["kind"] == "latent"]
            node = max(lat, key=lambda n: n["mlsae"]["influence"])
            dot = page.locator(f"#graph-svg circle[data-id='{node['node_id']}']")
            dot.dispatch_event("mouseenter")  # nodes of one cell may overlap
            expect(page.locator("#graph-hover")).to_contain_text(f"Latent {node['feature']}")
            expect(page.locator("#graph-hover .mini-bar")).to_have_count(4)
            # click pins it: its edges light up, the intervention box lists it
            dot.dispatch_event("click")
            expect(dot).to_have_class("gnode pinned hot")
            expect(page.locator("#graph-svg line.glink.hot").first).to_be_attached()
            expect(page.locator("#graph-pinned .edit")).to_have_count(1)
            expect(page.locator("#graph-pinned .edit")).to_contain_text(
                f"latent {node['feature']} at layer {node['layer']}")
            page.click("#graph-apply")
            expect(page.locator("#graph-result table").nth(1).locator("tbody tr")).to_have_count(
                10)
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
            assert not errors
        finally:
            browser.close()
