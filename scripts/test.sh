#!/usr/bin/env bash
# Fresh machine -> environment with test extras -> lint -> the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,interop,logging
# Browser tests drive Debian's Chromium (never a downloaded browser); they skip, saying why,
# where it cannot be installed.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "chromium could not be installed: browser tests will be skipped"
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
