"""Request and response bodies of the explorer's JSON API (they are its OpenAPI schema).

Layers are LM block numbers everywhere in the API (as in a run's config.json `layers`), and
only the SAE's layers are accepted. Token position 0 of every prompt is the EOS token that
starts each document in the packed training text (see `Explorer.tokenize`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

# A prompt must be non-empty; its token cap is per app (--max-prompt-tokens), checked later.
PromptText = Annotated[str, Field(min_length=1, description="the prompt text",
                                  examples=["The quick brown fox"])]
Top = Annotated[int, Field(ge=1, le=200)]
# strict: a JSON string such as "2" is refused rather than coerced; NaN/inf are refused
# because they would turn every logit into NaN.
Factor = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e4, le=1e4,
                                description="added to the latent's activation (units of "
                                "the SAE's standardized space)")]


class ErrorBody(BaseModel):
    detail: str


# ---- info ----------------------------------------------------------------------------------
class Info(BaseModel):
    run: str
    model: str
    d_model: int
    n_latents: int
    k: int
    layers: list[int] = Field(description="LM blocks the SAE reads (resid_post)")
    lm_layers: int
    max_prompt_tokens: int
    exclude_first: int
    exclude_special: bool
    exclude_outliers: float = Field(0.0, description="the run's outlier rule: a prompt token "
                                    "whose norm at any layer exceeds this many times the "
                                    "layer's median over the prompt is excluded (0: off)")
    lens: str | None = Field(None, description="a lens run's tuned lens (mlsae train --lens): "
                             "the SAE encodes translated vectors; None without one")
    has_distributions: bool = Field(description="<run>/analysis/dists.safetensors exists")
    has_examples: bool = Field(description="<run>/analysis/examples.sqlite exists")
    steering: str = Field(description="how a steering factor is applied")


# ---- prompt --------------------------------------------------------------------------------
class PromptRequest(BaseModel):
    prompt: PromptText
    top_latents: Top = Field(32, description="latents in the heatmap")


class Token(BaseModel):
    position: int
    id: int
    text: str
    included: bool = Field(description="counted in statistics (training excludes position 0 "
                           "and special tokens)")


class Heatmap(BaseModel):
    latents: list[int] = Field(description="latents with the largest summed activation over "
                               "the included tokens, ordered by mean layer")
    values: list[list[float]] = Field(description="[layer][latent]: summed activation "
                                      "normalised over layers (each column sums to 1)")
    totals: list[list[float]] = Field(description="[layer][latent]: summed activation")


class PromptResponse(BaseModel):
    tokens: list[Token]
    layers: list[int]
    heatmap: Heatmap


# ---- token ---------------------------------------------------------------------------------
class TokenRequest(BaseModel):
    prompt: PromptText
    position: int = Field(ge=0, description="token position (0 is the leading EOS)")
    top: Top = 8


class LatentValue(BaseModel):
    latent: int
    activation: float


class LayerLatents(BaseModel):
    layer: int
    latents: list[LatentValue] = Field(description="active latents, largest first")


class TokenResponse(BaseModel):
    token: Token
    layers: list[LayerLatents]


# ---- latent --------------------------------------------------------------------------------
class Distribution(BaseModel):
    available: bool
    hint: str | None = Field(None, description="how to make it, when not available")
    layers: list[int] = []
    counts: list[int] = Field([], description="tokens where the latent fired, per layer")
    totals: list[float] = Field([], description="sum of its activations, per layer")
    probs: list[float] = Field([], description="totals normalised over layers")
    included_tokens: int | None = None


class Example(BaseModel):
    rank: int
    activation: float
    seq: int
    pos: int
    tokens: list[str]
    acts: list[float] = Field(description="this latent's activation at each context token")
    max_index: int = Field(description="index of the max-activating token in `tokens`")


class LayerExampleCount(BaseModel):
    layer: int
    count: int
    max_activation: float


class Examples(BaseModel):
    available: bool
    hint: str | None = None
    layer: int | None = None
    layers: list[LayerExampleCount] = Field([], description="layers holding examples")
    examples: list[Example] = []


class TokenValue(BaseModel):
    id: int
    text: str
    value: float


class LogitEffect(BaseModel):
    available: bool
    hint: str | None = None
    top: list[TokenValue] = Field([], description="tokens W_dec[latent] promotes most "
                                  "(final norm + unembedding, minus the zero vector's logits)")
    bottom: list[TokenValue] = Field([], description="tokens it suppresses most")


class Density(BaseModel):
    available: bool
    hint: str | None = None
    layers: list[int] = []
    bin_edges: list[float] = Field([], description="activation bin edges (log-spaced)")
    counts: list[list[int]] = Field([], description="[layer][bin]: nonzero activations")
    included_tokens: int | None = None


class LayerExamples(BaseModel):
    layer: int
    examples: list[Example]


class LatentResponse(BaseModel):
    latent: int
    distribution: Distribution
    examples: Examples
    logit_effect: LogitEffect | None = None
    density: Density | None = None
    examples_by_layer: list[LayerExamples] = Field([], description="the top examples of "
                                                   "every layer holding examples")


# ---- logits --------------------------------------------------------------------------------
class LogitsRequest(BaseModel):
    prompt: PromptText
    layer: int | None = Field(None, description="splice the SAE reconstruction in at this "
                              "layer (none: clean only)")
    top: Top = 10


class TokenProb(BaseModel):
    id: int
    text: str
    prob: float


class TokenChange(TokenProb):
    clean_prob: float
    delta: float = Field(description="prob - clean_prob")


class Modified(BaseModel):
    layer: int
    kl: float = Field(description="KL(clean || modified) of the next-token distribution")
    top: list[TokenChange] = Field(description="most likely next tokens after the change")
    increased: list[TokenChange]
    decreased: list[TokenChange]


class LogitsResponse(BaseModel):
    position: int = Field(description="the predicting position (the prompt's last token)")
    clean: list[TokenProb]
    spliced: Modified | None = None


class SteerRequest(BaseModel):
    prompt: PromptText
    latent: int
    layer: int
    factor: Factor
    top: Top = 10


class SteerResponse(BaseModel):
    latent: int
    factor: float
    relative_norm: float = Field(description="mean over steered positions of "
                                 "||added vector|| / ||resid_post||")
    clean: list[TokenProb]
    steered: Modified


# ---- graph (attribution graphs, mlsae.circuits) ----------------------------------------------
Threshold = Annotated[float, Field(ge=0.0, le=1.0)]


class GraphRequest(BaseModel):
    prompt: PromptText
    target: str | None = Field(None, description="the target token, exactly one token "
                               "(default: the model's top prediction)")
    contrast: str | None = Field(None, description="with metric logit-diff: the token whose "
                                 "logit is subtracted")
    metric: str = Field("logit", description="logit (de-meaned) or logit-diff")
    mode: str = Field("jacobian", description="jacobian or frozen-mlp")
    node_threshold: Threshold = 0.8
    edge_threshold: Threshold = 0.98


class GraphResponse(BaseModel):
    """circuit-tracer's graph JSON (the file `mlsae graph` writes, pruned; see
    docs/guides/circuits.md), without the causal checks (those need minutes)."""

    metadata: dict
    qParams: dict
    nodes: list[dict]
    links: list[dict]


class LatentEdit(BaseModel):
    latent: int = Field(ge=0)
    layer: int
    scale: Factor = Field(description="multiplies the latent's activation at every included "
                          "position of the layer (0 ablates it)")


class InterveneRequest(BaseModel):
    prompt: PromptText
    edits: list[LatentEdit] = Field(min_length=1, max_length=200)
    top: Top = 10


class InterveneResponse(BaseModel):
    edits: list[LatentEdit]
    kl: float = Field(description="KL(clean || edited) of the next-token distribution")
    clean: list[TokenProb]
    top: list[TokenChange] = Field(description="most likely next tokens after the edits")
    increased: list[TokenChange]
    decreased: list[TokenChange]
