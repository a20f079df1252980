#!/usr/bin/env bash
# Fresh machine -> environment with test extras -> lint -> the docs (strict build, tutorials
# executed) -> the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interop,logging,docs
# Browser tests drive Debian's Chromium (never a downloaded browser); they skip, saying why,
# where it cannot be installed.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "chromium could not be installed: browser tests will be skipped"
fi
.venv/bin/ruff check .
# The docs, built strictly and offline into site/: a broken link, a nav entry without its
# page or a public name in the API reference without a docstring fails; building executes
# both tutorial notebooks (docs/tutorials/) on a tiny random model.
t0=$SECONDS
HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
echo "docs built strictly, tutorials executed: $((SECONDS - t0)) s"
.venv/bin/python -m pytest -q "$@"
