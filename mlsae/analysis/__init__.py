"""Analyses of a trained MLSAE (SPEC §5). ``stats`` holds the pure-tensor statistics; the
command modules (analyze, resid_sim, mmcs, examples, report) stream text and write files."""

from mlsae.analysis.analyze import analyze, load_dists
from mlsae.analysis.examples import collect_examples, format_example, show_examples
from mlsae.analysis.mmcs import mmcs
from mlsae.analysis.report import report
from mlsae.analysis.resid_sim import resid_sim
from mlsae.analysis.stats import (
    DEFAULT_MIN_COUNT,
    DEFAULT_MIN_FRAC,
    LayerDistribution,
    PerTokenLayerVariance,
    ResidSimilarity,
    TopExamples,
    aggregated_layer_var,
    example_locations,
    heatmap_latents,
    layer_entropy,
    layer_moments,
    layer_probs,
    max_cosine_between,
    max_cosine_within,
    mmcs_between,
    mmcs_within,
    n_active_layers,
    normalize_over_layers,
    prompt_distribution,
    query_examples,
    std_histogram,
    update_contexts,
)

__all__ = [
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_FRAC",
    "LayerDistribution",
    "PerTokenLayerVariance",
    "ResidSimilarity",
    "TopExamples",
    "aggregated_layer_var",
    "analyze",
    "collect_examples",
    "example_locations",
    "format_example",
    "heatmap_latents",
    "layer_entropy",
    "layer_moments",
    "layer_probs",
    "load_dists",
    "max_cosine_between",
    "max_cosine_within",
    "mmcs",
    "mmcs_between",
    "mmcs_within",
    "n_active_layers",
    "normalize_over_layers",
    "prompt_distribution",
    "query_examples",
    "report",
    "resid_sim",
    "show_examples",
    "std_histogram",
    "update_contexts",
]
