"""Screenshots of the built docs site (`mkdocs build` -> site/): the start page and an API
reference page, taken in headless Debian Chromium against a static server on 127.0.0.1.

    .venv/bin/python bench/docs_screenshots.py [--site site] [--out docs/screenshots]

Writes OUT/docs_home.png and OUT/docs_api.png (the reference page of `MLSAE`).
"""

from __future__ import annotations

import argparse
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"docs_home.png": "", "docs_api.png": "reference/sae/"}


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log on stderr
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=Path("site"))
    ap.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    ap.add_argument("--height", type=int, default=1100, help="viewport height (pixels)")
    args = ap.parse_args()
    if not (args.site / "index.html").is_file():
        raise SystemExit(f"{args.site}/index.html not found: run `mkdocs build` first")
    handler = functools.partial(Quiet, directory=str(args.site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": args.height})
            for name, path in PAGES.items():
                page.goto(url + path)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(args.out / name))
            browser.close()
    finally:
        server.shutdown()
    print(f"wrote {', '.join(PAGES)} in {args.out}")


if __name__ == "__main__":
    main()
