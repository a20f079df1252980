"""Screenshots of the explorer's three views (Prompt, Latent, Logits) for a run, taken in
headless Debian Chromium against a server started in this process on 127.0.0.1.

    .venv/bin/python bench/serve_screenshots.py RUN --out DIR [--prompt TEXT] [--token N]
        [--layer L] [--factor F] [--model M] [--device cpu]

Writes DIR/prompt.png (token N clicked), DIR/latent.png (its strongest latent at the first
layer) and DIR/logits.png (reconstruction spliced in at layer L, and that latent steered).
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
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = create_app(args.run, model=args.model, device=args.device)
    with background(app) as url:
        shoot(url, args.out, args.prompt, args.token, args.layer, args.factor)
    print(f"wrote prompt.png, latent.png and logits.png in {args.out}")


if __name__ == "__main__":
    main()
