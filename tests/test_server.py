"""`mlsae serve`: the JSON API (every endpoint, every bad input), concurrency, the CLI, and the
front end in real headless Chromium. One tiny trained run, analysed by the real `analyze` and
`examples` code, and a copy of it without analysis files."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.analysis.analyze import analyze, load_dists
from mlsae.analysis.examples import collect_examples
from mlsae.cli import main
from mlsae.data import include_mask
from mlsae.options import TextOptions
from mlsae.runs import run_data_config
from mlsae.sae import MLSAE, SparseCode
from mlsae.server.app import create_app
from mlsae.server.runner import background, bind
from mlsae.train import RunConfig, train

PROMPT = "The quick brown fox"  # byte tokenizer: one token per character, after the EOS
MAX_TOKENS = 40
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def runs(tiny_lm, text_file, tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny run with dists.safetensors and examples.sqlite, the same run without them)."""
    root = tmp_path_factory.mktemp("serve")
    cfg = RunConfig(SAEConfig(expansion_factor=4, k=8),
                    DataConfig(dataset=str(text_file), ctx_len=32),
                    TrainConfig(out=str(root / "bare"), model="tiny", layers="all",
                                tokens=4 * 32 * 10, batch_size=4, log_every=5, save_every=100,
                                eval_tokens=256, dead_tokens=300))
    train(cfg, lm=tiny_lm, progress=False)
    full = root / "full"
    shutil.copytree(root / "bare", full)
    opts = TextOptions(tokens=1024, batch_size=4)
    analyze(full, opts, lm=tiny_lm, progress=False)
    collect_examples(full, opts, top=4, window=3, lm=tiny_lm, progress=False)
    return full, root / "bare"


@pytest.fixture(scope="module")
def app(runs, tiny_lm):
    return create_app(runs[0], lm=tiny_lm, max_prompt_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app)  # a server-side exception (500) would raise here


@pytest.fixture(scope="module")
def bare_client(runs, tiny_lm) -> TestClient:
    return TestClient(create_app(runs[1], lm=tiny_lm, max_prompt_tokens=MAX_TOKENS))


@pytest.fixture(scope="module")
def sae(runs) -> MLSAE:
    return MLSAE.from_pretrained(runs[0])


def prompt_ids(tiny_lm, text: str = PROMPT) -> torch.Tensor:
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    return torch.tensor([[tiny_lm.eos_id, *ids]])


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


# ---- endpoints -----------------------------------------------------------------------------
def test_info_static_and_openapi(client, bare_client, runs):
    info = ok(client.get("/api/info"))
    assert info["layers"] == [0, 1, 2, 3] and info["n_latents"] == 128 and info["k"] == 8
    assert info["max_prompt_tokens"] == MAX_TOKENS and info["exclude_first"] == 1
    assert info["has_distributions"] and info["has_examples"] and "std" in info["steering"]
    bare = ok(bare_client.get("/api/info"))
    assert not bare["has_distributions"] and not bare["has_examples"]
    assert "mlsae explorer" in client.get("/").text
    for name in ("app.js", "style.css", "index.html"):
        assert client.get(f"/static/{name}").status_code == 200
    paths = ok(client.get("/openapi.json"))["paths"]
    assert {"/api/info", "/api/prompt", "/api/token", "/api/latents/{latent}", "/api/logits",
            "/api/steer"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_prompt_heatmap_sums_included_tokens(client, tiny_lm, sae):
    res = ok(client.post("/api/prompt", json={"prompt": PROMPT, "top_latents": 6}))
    toks = res["tokens"]
    assert [t["position"] for t in toks] == list(range(len(PROMPT) + 1))
    assert toks[0]["id"] == tiny_lm.eos_id and not toks[0]["included"]
    assert all(t["included"] for t in toks[1:])
    assert "".join(t["text"] for t in toks[1:]) == PROMPT
    heat = res["heatmap"]
    assert res["layers"] == [0, 1, 2, 3] and len(heat["latents"]) == 6
    values, totals = torch.tensor(heat["values"]), torch.tensor(heat["totals"])
    assert values.shape == (4, 6)
    assert values.sum(0).tolist() == pytest.approx([1.0] * 6)
    # independently: dense activations summed over the included positions (1..T)
    with torch.inference_mode():
        resid = tiny_lm.resid_post(prompt_ids(tiny_lm), [0, 1, 2, 3])[:, 0, 1:]
        dense = torch.zeros(4, sae.n_latents)
        for i in range(4):
            code = sae.encode(resid[i])
            dense[i] = torch.zeros(len(code.acts), sae.n_latents).scatter_(
                1, code.idx, code.acts).sum(0)
    expected = dense[:, heat["latents"]]
    assert torch.allclose(totals.float(), expected, atol=1e-4)
    assert set(heat["latents"]) == set(dense.sum(0).topk(6).indices.tolist())


def test_token_lists_top_latents_per_layer(client, tiny_lm, sae):
    res = ok(client.post("/api/token", json={"prompt": PROMPT, "position": 5, "top": 3}))
    q = prompt_ids(tiny_lm)[0, 5].item()
    assert res["token"] == {"position": 5, "id": q, "text": "q", "included": True}
    resid = tiny_lm.resid_post(prompt_ids(tiny_lm), [0, 1, 2, 3])[:, 0, 5]
    for i, row in enumerate(res["layers"]):
        with torch.inference_mode():
            code = sae.encode(resid[i])
        vals, order = code.acts.sort(descending=True)
        assert row["layer"] == i
        assert [v["latent"] for v in row["latents"]] == code.idx[order][:3].tolist()
        assert [v["activation"] for v in row["latents"]] == pytest.approx(vals[:3].tolist())
    first = ok(client.post("/api/token", json={"prompt": PROMPT, "position": 0}))
    assert not first["token"]["included"] and len(first["layers"]) == 4  # shown all the same


def test_latent_reads_analysis_files(client, runs):
    counts, totals, layers = load_dists(runs[0] / "analysis" / "dists.safetensors")
    latent = int(counts.sum(0).argmax())
    res = ok(client.get(f"/api/latents/{latent}"))
    dist, ex = res["distribution"], res["examples"]
    assert dist["available"] and dist["layers"] == layers
    assert dist["counts"] == counts[:, latent].tolist()
    assert sum(dist["probs"]) == pytest.approx(1)
    assert ex["available"] and ex["examples"]
    best = max(ex["layers"], key=lambda c: c["max_activation"])
    assert ex["layer"] == best["layer"]  # default: the layer of the strongest example
    acts = [e["activation"] for e in ex["examples"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == best["max_activation"]
    for e in ex["examples"]:
        assert len(e["tokens"]) == len(e["acts"]) > e["max_index"] >= 0
        assert e["acts"][e["max_index"]] == pytest.approx(e["activation"], abs=1e-3)
    other = next(c["layer"] for c in ex["layers"] if c["layer"] != ex["layer"])
    limited = ok(client.get(f"/api/latents/{latent}", params={"layer": other, "limit": 1}))
    assert limited["examples"]["layer"] == other and len(limited["examples"]["examples"]) == 1


def test_latent_without_analysis_says_how_to_make_it(bare_client, runs):
    res = ok(bare_client.get("/api/latents/3", params={"layer": 1}))
    assert not res["distribution"]["available"] and not res["examples"]["available"]
    assert f"mlsae analyze {runs[1]}" in res["distribution"]["hint"]
    assert f"mlsae examples {runs[1]}" in res["examples"]["hint"]


def test_logits_clean_and_spliced(client, tiny_lm, sae, runs):
    ids = prompt_ids(tiny_lm)
    clean_p = tiny_lm.logits(ids)[0, -1].softmax(-1)
    res = ok(client.post("/api/logits", json={"prompt": PROMPT, "top": 5}))
    assert res["position"] == len(PROMPT) and res["spliced"] is None
    assert [t["id"] for t in res["clean"]] == clean_p.topk(5).indices.tolist()
    assert [t["prob"] for t in res["clean"]] == pytest.approx(clean_p.topk(5).values.tolist())
    spliced = ok(client.post("/api/logits", json={"prompt": PROMPT, "layer": 2,
                                                  "top": 5}))["spliced"]
    # independently: resid_post of block 2 replaced by x_hat at the included positions
    mask = include_mask(ids, tiny_lm.special_ids, run_data_config(sae, TextOptions()))
    with torch.inference_mode():
        resid = tiny_lm.resid_post(ids, [2])[0]
        resid[mask] = sae(resid[mask]).x_hat
        p = tiny_lm.logits_from(ids, 2, resid)[0, -1].softmax(-1)
    assert spliced["layer"] == 2 and spliced["kl"] > 0
    assert [t["id"] for t in spliced["top"]] == p.topk(5).indices.tolist()
    for t in spliced["top"] + spliced["increased"] + spliced["decreased"]:
        assert t["prob"] == pytest.approx(p[t["id"]].item(), abs=1e-6)
        assert t["delta"] == pytest.approx(t["prob"] - t["clean_prob"], abs=1e-7)
    assert all(t["delta"] > 0 for t in spliced["increased"][:1])
    assert all(t["delta"] < 0 for t in spliced["decreased"][:1])


def test_steering_adds_the_decoders_change(client, tiny_lm, sae):
    ids, layer, latent, factor = prompt_ids(tiny_lm), 1, 7, 25.0
    with torch.inference_mode():
        x = tiny_lm.resid_post(ids, [layer])[0, 0]  # [T, d]
        code = sae.encode(x)
        # the documented un-standardization: raising latent f's activation by `factor` in
        # the SAE's decoder moves its output by factor * (std + eps) * W_dec[f]
        more = SparseCode(torch.cat([code.acts, torch.full_like(code.acts[:, :1], factor)], 1),
                          torch.cat([code.idx, torch.full_like(code.idx[:, :1], latent)], 1),
                          code.mu, code.std)
        add = sae.decode(more) - sae.decode(code)
        assert torch.allclose(add, factor * (code.std + sae.eps) * sae.W_dec[latent],
                              atol=1e-3)
        add[0] = 0  # position 0 (the leading EOS) is excluded, so not steered
        p = tiny_lm.logits_from(ids, layer, (x + add)[None])[0, -1].softmax(-1)
    body = {"prompt": PROMPT, "latent": latent, "layer": layer, "factor": factor, "top": 5}
    res = ok(client.post("/api/steer", json=body))
    steered = res["steered"]
    assert res["latent"] == latent and res["factor"] == factor and steered["layer"] == layer
    assert [t["id"] for t in steered["top"]] == p.topk(5).indices.tolist()
    assert [t["prob"] for t in steered["top"]] == pytest.approx(p.topk(5).values.tolist(),
                                                                abs=1e-6)
    ratio = (add.norm(dim=-1) / x.norm(dim=-1))[1:].mean().item()
    assert res["relative_norm"] == pytest.approx(ratio, rel=1e-4) and steered["kl"] > 0
    zero = ok(client.post("/api/steer", json=dict(body, factor=0)))["steered"]
    assert zero["kl"] == pytest.approx(0, abs=1e-6)
    assert all(t["delta"] == pytest.approx(0, abs=1e-6) for t in zero["top"])


# ---- bad input: 4xx with a message, never a 500 ----------------------------------------------
LONG = "x" * (MAX_TOKENS + 1)
GOOD_STEER = {"prompt": PROMPT, "latent": 3, "layer": 1, "factor": 2.0}
BAD = [
    ("GET", "/api/latents/128", None, 404, "latent 128 does not exist"),
    ("GET", "/api/latents/-1", None, 404, "latent -1 does not exist"),
    ("GET", "/api/latents/abc", None, 422, "latent: Input should be a valid integer"),
    ("GET", "/api/latents/3?layer=4", None, 422, "layer 4 is not a layer of the SAE"),
    ("GET", "/api/latents/3?layer=x", None, 422, "layer: Input should be a valid integer"),
    ("GET", "/api/latents/3?limit=0", None, 422, "limit: Input should be greater than"),
    ("POST", "/api/prompt", {"prompt": ""}, 422, "prompt: String should have at least 1"),
    ("POST", "/api/prompt", {"prompt": LONG}, 422, f"the limit is {MAX_TOKENS}"),
    ("POST", "/api/prompt", {"prompt": "x" * 100_000}, 422, "the prompt is too long"),
    ("POST", "/api/prompt", {}, 422, "prompt: Field required"),
    ("POST", "/api/prompt", {"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ("POST", "/api/prompt", {"prompt": PROMPT, "top_latents": 0}, 422, "top_latents"),
    ("POST", "/api/token", {"prompt": "", "position": 1}, 422, "prompt: String should"),
    ("POST", "/api/token", {"prompt": LONG, "position": 1}, 422, f"the limit is {MAX_TOKENS}"),
    ("POST", "/api/token", {"prompt": "hi", "position": 3}, 422, "position 3 is past"),
    ("POST", "/api/token", {"prompt": "hi", "position": -1}, 422, "position: Input should"),
    ("POST", "/api/logits", {"prompt": ""}, 422, "prompt: String should"),
    ("POST", "/api/logits", {"prompt": LONG}, 422, f"the limit is {MAX_TOKENS}"),
    ("POST", "/api/logits", {"prompt": "hi", "layer": 4}, 422, "layer 4 is not a layer"),
    ("POST", "/api/logits", {"prompt": "hi", "layer": -1}, 422, "layer -1 is not a layer"),
    ("POST", "/api/logits", {"prompt": "hi", "top": 100_000}, 422, "top: Input should be"),
    ("POST", "/api/steer", dict(GOOD_STEER, prompt=""), 422, "prompt: String should"),
    ("POST", "/api/steer", dict(GOOD_STEER, prompt=LONG), 422, f"the limit is {MAX_TOKENS}"),
    ("POST", "/api/steer", dict(GOOD_STEER, latent=128), 422, "latent 128 does not exist"),
    ("POST", "/api/steer", dict(GOOD_STEER, latent=-5), 422, "latent -5 does not exist"),
    ("POST", "/api/steer", dict(GOOD_STEER, layer=9), 422, "layer 9 is not a layer"),
    ("POST", "/api/steer", dict(GOOD_STEER, factor="abc"), 422, "factor: Input should be a "
     "valid number"),
    ("POST", "/api/steer", dict(GOOD_STEER, factor="2"), 422, "factor: Input should be a valid"),
    ("POST", "/api/steer", dict(GOOD_STEER, factor=None), 422, "factor: Input should be a valid"),
    ("POST", "/api/steer", dict(GOOD_STEER, factor=1e9), 422, "factor: Input should be less"),
    ("POST", "/api/steer", {"prompt": PROMPT, "layer": 1}, 422, "latent: Field required"),
    ("POST", "/api/steer", '{"prompt": "hi", "latent": 3, "layer": 1, "factor": NaN}', 422,
     "factor: Input should be a finite number"),
    ("POST", "/api/steer", '{"prompt": "hi", "latent": 3, "layer": 1, "factor": Infinity}',
     422, "factor: Input should be a finite number"),
    ("POST", "/api/steer", '{"prompt": "hi", ', 422, "the request body is not valid JSON"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), BAD,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_rest) in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_a_message(client, method, path, body, status, message):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(
        body, str) else {"json": body}
    res = client.request(method, path, **kw)
    assert res.status_code == status, res.text
    assert message in res.json()["detail"]


# ---- concurrency ----------------------------------------------------------------------------
def test_concurrent_requests_match_sequential(app):
    texts = ["The quick brown fox", "def f(x): return x", "Hello, world!", "a b c d e f g"]
    reqs = []
    for i, text in enumerate(texts):
        reqs += [("POST", "/api/prompt", {"prompt": text, "top_latents": 8}),
                 ("POST", "/api/token", {"prompt": text, "position": 1 + i}),
                 ("POST", "/api/logits", {"prompt": text, "layer": i % 4}),
                 ("POST", "/api/steer", {"prompt": text, "latent": 10 * i, "layer": 3 - i,
                                         "factor": 5.0 * (i + 1)}),
                 ("GET", f"/api/latents/{i}", None)]
    with background(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def send(req):
            method, path, body = req
            return ok(http.request(method, path, json=body))

        expected = [send(r) for r in reqs]
        order = [i for i in range(len(reqs)) for _ in range(3)]
        random.Random(0).shuffle(order)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: send(reqs[i]), order))
    for i, res in zip(order, got):
        assert res == expected[i], reqs[i]


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_serve_prints_url_and_serves(runs, tiny_model_dir):
    cmd = [sys.executable, "-m", "mlsae", "serve", str(runs[0]), "--model", str(tiny_model_dir),
           "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    watchdog = threading.Timer(120, proc.kill)  # a hung start fails the test, not the run
    watchdog.start()
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port bound
        assert line.startswith("mlsae explorer: http://127.0.0.1:"), proc.stderr.read()
        url = line.split()[2]
        info = ok(httpx.get(f"{url}/api/info", timeout=30))
        assert info["model"] == str(tiny_model_dir) and info["layers"] == [0, 1, 2, 3]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then exit 130
        assert proc.wait(timeout=30) == 130
        watchdog.cancel()
    assert "Traceback" not in proc.stderr.read()


def test_bound_port_queues_a_client_before_the_server_runs():
    # `mlsae serve` prints its URL after binding and before uvicorn starts: a client that
    # connects in between must be queued, not refused
    with bind("127.0.0.1", 0) as sock:
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
        client.close()


def test_cli_serve_errors_are_one_line(runs, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(runs[0]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mlsae serve: error: cannot listen on 127.0.0.1:{port}")
    assert main(["serve", str(runs[0] / "nope"), "--port", "0"]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["serve", str(runs[0]), "--port", "0", "--max-prompt-tokens", "0"]) == 2
    assert "--max-prompt-tokens must be positive" in capsys.readouterr().err


# ---- the front end in headless Chromium --------------------------------------------------------
def _launch(playwright):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    try:
        return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as e:  # any launch failure means no browser on this machine
        pytest.skip(f"headless Chromium ({CHROMIUM}) cannot be launched: {e}")


def _latent_with_examples(client, chips: list[str], layer: int) -> str:
    """The first chip ('#<latent> <value>') whose latent has examples at `layer`."""
    for chip in chips:
        latent = int(chip.split()[0][1:])
        found = ok(client.get(f"/api/latents/{latent}", params={"layer": layer}))["examples"]
        if found["examples"]:
            return chip
    raise AssertionError("no latent of the token has examples at layer 0")


def test_browser_end_to_end(app, client):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    expect = sync_api.expect
    expect.set_options(timeout=20_000)
    with background(app) as url, sync_api.sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#run-info")).to_contain_text("tiny-llama")

            # Prompt view: tokens, heatmap, one token's latents per layer
            page.fill("#prompt", PROMPT)
            page.click("#analyse")
            tokens = page.locator("#tokens .tok")
            expect(tokens).to_have_count(len(PROMPT) + 1)
            expect(page.locator("#tokens .tok.excluded")).to_have_count(1)
            expect(page.locator("#heatmap tbody tr")).to_have_count(4)
            heat = ok(client.post("/api/prompt", json={"prompt": PROMPT}))["heatmap"]
            expect(page.locator("#heatmap thead .latent-link")).to_have_count(
                len(heat["latents"]))
            tokens.nth(5).click()
            expect(page.locator("#token-title")).to_have_text("Token 5: “q”")
            expect(page.locator("#token-detail tr")).to_have_count(4)
            layer0 = page.locator("#token-detail tr").first.locator(".chip")
            expect(layer0.first).to_be_visible()
            chip = _latent_with_examples(client, layer0.all_inner_texts(), layer=0)
            latent = int(chip.split()[0][1:])

            # Latent view: distribution bars and shaded examples at the clicked layer
            layer0.filter(has_text=chip.split()[0] + " ").first.click()
            expect(page.locator("#view-latent")).to_be_visible()
            expect(page.locator("#latent-title")).to_have_text(f"Latent {latent}")
            expect(page.locator("#latent-dist .bar-row")).to_have_count(4)
            expect(page.locator("#examples-title")).to_have_text(
                "Max-activating examples at layer 0")
            stored = ok(client.get(f"/api/latents/{latent}", params={"layer": 0}))
            first = stored["examples"]["examples"][0]
            shown = page.locator("#latent-examples .example").first
            expect(shown.locator(".ctx-tok")).to_have_count(len(first["tokens"]))
            expect(shown.locator(".ctx-tok.max")).to_have_count(1)

            # Logits view: clean and spliced, then steering (a bad factor shows the message)
            page.click("#tabs button[data-view=logits]")
            page.select_option("#splice-layer", "2")
            page.click("#logits-form button")
            expect(page.locator("#logits-clean tbody tr")).to_have_count(10)
            expect(page.locator("#logits-spliced caption")).to_contain_text("layer 2")
            expect(page.locator("#steer-latent")).to_have_value(str(latent))
            page.fill("#steer-factor", "abc")
            page.click("#steer-form button")
            expect(page.locator("#error")).to_contain_text("factor: Input should be a valid")
            page.fill("#steer-factor", "20")
            page.click("#steer-form button")
            expect(page.locator("#steer-top tbody tr")).to_have_count(10)
            expect(page.locator("#steer-summary")).to_contain_text(f"Latent {latent} × 20")
            expect(page.locator("#error")).to_be_hidden()
            assert not errors
        finally:
            browser.close()
