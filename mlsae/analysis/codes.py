"""A run's SAE codes over text: the one streaming loop that `analyze` and `examples` share.
Uses activations, runs, the LM adapter and the SAE.

Positions are excluded exactly as in training (SPEC §2): `batch_activations` keeps only the
included positions, and the codes are scattered back into the `[batch, seq]` grid with zero
activation at excluded positions, so every statistic that ignores zero activations also
ignores excluded positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.activations import batch_activations
from mlsae.config import DataConfig
from mlsae.errors import UserError
from mlsae.evaluate import check_text_options
from mlsae.lens import TunedLens, sae_lens
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions
from mlsae.runs import (
    check_lm_matches,
    eval_batches,
    load_run_lm,
    load_sae,
    run_data_config,
    sae_layers,
)
from mlsae.sae import MLSAE


def analysis_dir(run: str | Path) -> Path:
    """`<run>/analysis/`, where every analysis command writes (created on demand)."""
    out = Path(run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


def require_run_dir(run: str | Path) -> Path:
    """The run folder; analyses write into it, so a hub id or missing folder is refused."""
    path = Path(run).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"run {str(run)!r}: no such run folder (expected config.json and "
                        "model.safetensors)")
    return path


def stats_device(device: torch.device) -> torch.device:
    """Where float64 streaming statistics live: on CUDA next to the activations (CPU sorts
    would become the bottleneck), else the CPU (MPS has no float64)."""
    return device if device.type == "cuda" else torch.device("cpu")


@dataclass
class RunCodes:
    """A run's SAE on the LM it was trained on, ready to encode token batches."""

    sae: MLSAE
    lm: LanguageModel
    layers: list[int]  # LM block numbers, in the SAE's layer order
    data_cfg: DataConfig
    opts: TextOptions
    lens: TunedLens | None = None  # a lens run (`mlsae train --lens`): encode translated x

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def stats_device(self) -> torch.device:
        return stats_device(self.lm.device)

    def text(self) -> tuple[list[Tensor], int]:
        """The run's held-out (or --dataset) text as `[batch, ctx_len]` id batches, and the
        number of tokens they hold."""
        _, batch_list, tokens = eval_batches(self.sae, self.lm, self.opts)
        return batch_list, tokens

    @torch.inference_mode()
    def encode(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Codes of `ids [batch, seq]` -> acts, idx `[layer, batch, seq, k]` (acts 0 at excluded
        positions) and the include mask `[batch, seq]` (on the LM's device)."""
        x, mask = batch_activations(self.lm, ids, self.layers, self.data_cfg, self.lm.device)
        if self.lens is not None:
            x = self.lens.translate(x, self.layers)
        mask = mask.to(self.lm.device)
        shape = (self.n_layers, *ids.shape, self.sae.k)
        acts = torch.zeros(shape, device=self.lm.device)
        idx = torch.zeros(shape, dtype=torch.long, device=self.lm.device)
        # one layer at a time: bounds the dense pre-activations to [token, n_latents]
        for i in range(self.n_layers):
            code = self.sae.encode(x[i])  # acts, idx [token, k]
            acts[i][mask], idx[i][mask] = code.acts, code.idx
        return acts, idx, mask

    def stream(self, batch_list: list[Tensor], desc: str, progress: bool = True
               ) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
        """(sequence offset, ids, acts, idx, mask) per batch, with a progress bar in tokens."""
        total = sum(b.numel() for b in batch_list)
        offset = 0
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True) as bar:
            for ids in batch_list:
                yield (offset, ids, *self.encode(ids))
                offset += len(ids)
                bar.update(ids.numel())


def open_run(run: str | Path, opts: TextOptions, lm: LanguageModel | None = None) -> RunCodes:
    """Load a run's SAE and its LM (or check the given `lm` against it); exact float32 top-k."""
    check_text_options(opts)
    sae = load_sae(require_run_dir(run), lens_ok=True)
    if lm is None:
        lm = load_run_lm(sae, opts)
    else:
        check_lm_matches(sae, lm)
    sae.to(lm.device)
    layers = sae_layers(sae)
    lens = sae_lens(run, sae.config, layers, sae.d_model)
    return RunCodes(sae, lm, layers, run_data_config(sae, opts), opts,
                    None if lens is None else lens.to(lm.device))


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (a byte-level piece of a longer character shows as
    U+FFFD): one string per position, for display."""
    return [tokenizer.decode([int(i)]) for i in ids]
