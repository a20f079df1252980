#!/usr/bin/env bash
# Fresh machine -> environment -> the default multi-layer SAE (SmolLM2-135M, all 30 layers,
# CPython docs text, offline) -> held-out per-layer summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlsae train "$@"
