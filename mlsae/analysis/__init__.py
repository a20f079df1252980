"""Analyses of a trained MLSAE (SPEC §5), one module per statistic, with its command beside it.

Statistics (pure tensors): `layer_dist` (per-latent layer distributions, prompt heatmaps),
`token_variance` (per-token vs aggregated layer variance), `resid_sim` (adjacent-layer
residual similarity, and `mlsae resid-sim`), `mmcs` (decoder geometry, and `mlsae mmcs`),
`top_examples` (bounded top-N examples and their SQLite store).
Commands: `codes` (a run's SAE codes over text, shared by the commands), `analyze`,
`examples`, `report`.

Uses data, activations, the LM adapter, the SAE, runs and evaluate; nothing imports it but
the server, plots and the CLI. This file re-exports nothing: import from the module.
"""
