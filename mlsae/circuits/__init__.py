"""Circuits across layers: attribution graphs over MLSAE latents (issue 22, SPEC §9).

    linear.py       the linearised model (frozen patterns, norm scales, SAE mu/std, active set)
    attribution.py  nodes and edges of one prompt's graph
    influence.py    node influence (Neumann series) and pruning by cumulative influence
    causal.py       faithfulness, completeness, the curve, the exactness check
    graphio.py      the graph as circuit-tracer / Neuronpedia JSON
    analysis.py     across prompts: self-edges (a latent to itself at the next layer)
    command.py      `mlsae graph` and its Python function `graph`
"""
