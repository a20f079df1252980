"""What an SAE architecture is: its activation rule (training form and inference form), its
extra tensors, its training-time extras (threshold estimation, penalties) and its options;
and the registry that maps a name (`--arch`) to one. Uses the shared sparse ops and codes.

Every architecture shares the MLSAE's parameters, standardization and sparse decode (SPEC §3);
only step 2 (which entries of z = (x~ - b_dec) W_enc + b_enc stay active) differs (SPEC §3a).
One file per architecture registers a subclass here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mlsae.sae.ops import Selection, above_threshold, encoder_topk

ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make an architecture available under its `name` (`--arch`)."""
    ARCHITECTURES[cls.name] = cls
    return cls


class Architecture:
    """The TopK rule's defaults; subclasses override what differs. An instance lives on one
    MLSAE (`sae.arch`) and holds the architecture's options (saved in config.json)."""

    name: ClassVar[str] = ""
    tensors: ClassVar[tuple[str, ...]] = ()  # extra tensors saved in model.safetensors
    options: ClassVar[dict] = {}  # option -> default (config.json keys)
    per_token: ClassVar[bool] = False  # encode_layers differs from encode

    def __init__(self, **opts):
        unknown = set(opts) - set(self.options)
        if unknown:
            raise TypeError(f"{self.name}: unknown options {sorted(unknown)}")
        self.opts = {**self.options, **opts}

    def setup(self, sae) -> None:
        """Register the architecture's extra tensors on `sae`."""

    def select(self, sae, xc: Tensor, *, train: bool, n_layers: int | None,
               matmul_dtype: torch.dtype | None, dead: Tensor | None, auxk: int) -> Selection:
        """Pick the entries of `xc [N, d] @ W_enc + b_enc` (no grad). `train`: the training
        rule; `n_layers`: rows are [layer, token] ordered with this many layers (for
        per-token rules; None: rows are unrelated vectors)."""
        vals, idx, aux_vals, aux_idx = encoder_topk(xc, sae.W_enc, sae.b_enc, sae.k,
                                                    matmul_dtype, dead, auxk)
        return Selection(vals, idx, None, aux_vals, aux_idx)

    def activate(self, sae, sel: Selection, train: bool) -> Tensor:
        """Activations of the selected slots (differentiable in `sel.vals`): ReLU, zero where
        masked out."""
        acts = F.relu(sel.vals)
        return acts if sel.mask is None else acts * sel.mask

    def penalty(self, sae, sel: Selection) -> Tensor | None:
        """A differentiable per-vector sparsity penalty `[N]` (JumpReLU's L0), or None."""
        return None

    @torch.no_grad()
    def init_from_batch(self, sae, xt: Tensor) -> None:
        """Data-dependent initialisation on the first batch of standardized vectors."""

    def level(self, sel: Selection, acts: Tensor) -> Tensor | None:
        """The batch statistic `after_step` tracks (a scalar; the loss takes its minimum
        over ranks), from the training selection and activations; None: the rule has none."""
        return None

    @torch.no_grad()
    def after_step(self, sae, min_kept: float) -> None:
        """Update running statistics after an optimizer step (`min_kept`: the global
        batch's `level`, inf when there is none)."""

    def active_rule(self, sae, per_token: bool = False) -> str:
        """One line saying when a latent counts as active, for summaries."""
        return f"topk: the k={sae.k} largest ReLU'd pre-activations of each vector, acts > 0"

    def prefixes(self, sae) -> list[int]:
        """Nested dictionary prefixes that must reconstruct on their own (Matryoshka)."""
        return []

    def config(self) -> dict:
        """The options as config.json records them (the MLSAE's `arch_options`)."""
        return dict(self.opts)


class ThresholdInference(Architecture):
    """Rules whose inference form is one threshold per latent (`threshold [n_latents]`):
    a = z+ * (z+ > threshold), so encoding a vector never depends on its batch."""

    tensors = ("threshold",)

    def setup(self, sae) -> None:
        sae.register_buffer("threshold", torch.zeros(sae.n_latents))

    def active_rule(self, sae, per_token: bool = False) -> str:
        theta = sae.threshold.detach().clamp_min(0)
        lo, hi = float(theta.min()), float(theta.max())
        what = f"theta={lo:.4g}" if lo == hi else f"per-latent theta in [{lo:.4g}, {hi:.4g}]"
        return f"{self.name}: z > threshold ({what}), each vector alone"

    def select(self, sae, xc, *, train, n_layers, matmul_dtype, dead, auxk) -> Selection:
        return above_threshold(xc, sae.W_enc, sae.b_enc, sae.threshold.clamp_min(0),
                               matmul_dtype, dead, auxk)


class RunningThreshold(ThresholdInference):
    """A budget rule at training time whose inference threshold is the running average of
    the smallest kept activation per training batch (Bussmann et al. 2024; SAELens'
    `topk_threshold`): theta <- (1 - lr) theta + lr * min, the first batch's minimum as
    the start (SAELens starts from 0, which a run of a few hundred steps never leaves). The
    trainer resolves lr's default, max(0.01, 10 / steps)."""

    options = {"threshold_lr": 0.01}

    def level(self, sel: Selection, acts: Tensor) -> Tensor:
        """The batch's smallest kept activation (inf when nothing fired)."""
        pos = acts[acts > 0]
        return pos.min() if len(pos) else acts.new_tensor(torch.inf)

    @torch.no_grad()
    def after_step(self, sae, min_kept: float) -> None:
        if not math.isfinite(min_kept):
            return
        theta = sae.threshold
        lr = float(self.opts["threshold_lr"])
        old = float(theta[0])
        theta.fill_(min_kept if old == 0 else (1 - lr) * old + lr * min_kept)


def make(name: str, opts: dict | None = None) -> Architecture:
    """The architecture `name` with `opts` (unknown keys ignored: a config holds them all)."""
    from mlsae.errors import UserError

    if name not in ARCHITECTURES:
        raise UserError(f"architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[name]
    return cls(**{k: v for k, v in (opts or {}).items() if k in cls.options})
