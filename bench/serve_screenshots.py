"""Screenshots of the explorer's three views (Prompt, Latent, Logits) for a run, taken in
headless Debian Chromium against a server started in this process on 127.0.0.1.

    .venv/bin/python bench/serve_screenshots.py RUN --out DIR [--prompt TEXT] [--token N]
        [--layer L] [--factor F] [--model M] [--device cpu]

Writes DIR/prompt.png (token N clicked), DIR/latent.png (its strongest latent at the first
layer) and DIR/logits.png (reconstruction spliced in at layer L, and that latent steered);
with --graph also DIR/graph.png (the Graph view: the prompt's attribution graph, its most
influential latent hovered and pinned, and ablated in the intervention box).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from mlsae.server.app import create_app
from mlsae.server.runner import background

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def shoot_graph(url: str, out: Path, prompt: str, threshold: str) -> None:
    expect.set_options(timeout=600_000)  # the whole graph on a shared CPU: minutes
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        expect(page.locator("#run-info")).not_to_be_empty()
        page.fill("#prompt", prompt)
        page.click("#tabs button[data-view=graph]")
        page.fill("#graph-node-threshold", threshold)
        page.click("#graph-build")
        expect(page.locator("#graph-svg circle").first).to_be_attached()
        best = page.evaluate("""() => {
            let best = null, infl = -1;
            for (const c of document.querySelectorAll('#graph-svg circle[data-kind=latent]')) {
                const r = Number(c.getAttribute('r'));
                if (r > infl) { infl = r; best = c.dataset.id; }
            }
            return best; }""")
        dot = page.locator(f"#graph-svg circle[data-id='{best}']")
        dot.dispatch_event("mouseenter")
        expect(page.locator("#graph-hover strong")).to_contain_text("Latent")
        dot.dispatch_event("click")
        page.click("#graph-apply")
        expect(page.locator("#graph-result table").first).to_be_visible()
        page.screenshot(path=str(out / "graph.png"), full_page=True)
        browser.close()


def shoot(url: str, out: Path, prompt: str, token: int, layer: str, factor: str) -> None:
    expect.set_options(timeout=120_000)  # a real LM on a shared CPU can take a while
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        expect(page.locator("#run-info")).not_to_be_empty()
        page.fill("#prompt", prompt)
        page.click("#analyse")
        expect(page.locator("#heatmap table")).to_be_visible()
        page.locator("#tokens .tok").nth(token).click()
        expect(page.locator("#token-detail table")).to_be_visible()
        page.screenshot(path=str(out / "prompt.png"), full_page=True)
        page.locator("#token-detail .chip").first.click()
        expect(page.locator("#latent-examples")).not_to_be_empty()
        page.screenshot(path=str(out / "latent.png"), full_page=True)
        page.click("#tabs button[data-view=logits]")
        page.select_option("#splice-layer", layer)
        page.click("#logits-form button")
        expect(page.locator("#logits-spliced table")).to_be_visible()
        page.select_option("#steer-layer", layer)
        page.fill("#steer-factor", factor)
        page.click("#steer-form button")
        expect(page.locator("#steer-top table")).to_be_visible()
        page.screenshot(path=str(out / "logits.png"), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompt", default="The capital of France is Paris, and the capital of "
                    "Italy is")
    ap.add_argument("--token", type=int, default=4, help="token position to click")
    ap.add_argument("--layer", default="15", help="splice / steering layer")
    ap.add_argument("--factor", default="20")
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--graph", action="store_true", help="also (only, with --only-graph) "
                    "the Graph view")
    ap.add_argument("--only-graph", action="store_true")
    ap.add_argument("--graph-prompt", default="counts = {}\nfor word in words:\n    "
                    "counts[word")
    ap.add_argument("--graph-threshold", default="0.5", help="node threshold of the shot")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = create_app(args.run, model=args.model, device=args.device)
    with background(app) as url:
        if not args.only_graph:
            shoot(url, args.out, args.prompt, args.token, args.layer, args.factor)
            print(f"wrote prompt.png, latent.png and logits.png in {args.out}")
        if args.graph or args.only_graph:
            shoot_graph(url, args.out, args.graph_prompt, args.graph_threshold)
            print(f"wrote graph.png in {args.out}")


if __name__ == "__main__":
    main()
