"""Compiled CPU kernels for the SAE hot path, each with a pure-torch fallback. Uses torch only."""
