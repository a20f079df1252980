"""Reading a trained run back: its SAE, its language model and its evaluation text.

Every command that reads text after training (eval, analyze, examples, ...) uses these so
that `--dataset/--tokens/--ctx-len` mean the same everywhere and the default is the run's
own held-out split. Uses data, lm, sae and options; nothing above them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor

from mlsae.config import DataConfig, from_dict
from mlsae.data import TokenSource, batches
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, load_lm
from mlsae.options import TextOptions
from mlsae.sae import MLSAE


def run_data_config(sae: MLSAE, opts: TextOptions) -> DataConfig:
    """The run's DataConfig with overrides; a given --dataset becomes the eval dataset."""
    run = sae.config.get("run", {})
    cfg = from_dict(DataConfig, run["data"]) if "data" in run else DataConfig(
        exclude_first=int(sae.config.get("exclude_first", 1)),
        exclude_special=bool(sae.config.get("exclude_special", True)))
    over = {k: getattr(opts, k) for k in ("split", "text_column", "ctx_len")
            if getattr(opts, k) is not None}
    cfg = replace(cfg, **over)
    if opts.dataset is not None:
        cfg = replace(cfg, eval_dataset=opts.dataset)
    if cfg.ctx_len <= cfg.exclude_first:
        raise UserError(f"--ctx-len must exceed the excluded leading positions "
                        f"({cfg.exclude_first})")
    return cfg


def load_sae(path: str | Path, device: str = "cpu") -> MLSAE:
    return MLSAE.from_pretrained(path, device=device)


def load_run_lm(sae: MLSAE, opts: TextOptions) -> LanguageModel:
    """The run's LM (or --model), checked against the SAE's d_model and layers."""
    name = opts.model or sae.config.get("model")
    if not name:
        raise UserError("the checkpoint names no model: pass --model")
    lm = load_lm(name, opts.device, opts.dtype)
    check_lm_matches(sae, lm)
    return lm


def check_lm_matches(sae: MLSAE, lm: LanguageModel) -> None:
    if lm.d_model != sae.d_model:
        raise UserError(f"model {lm.name!r} has d_model {lm.d_model}, the checkpoint "
                        f"{sae.d_model}")
    layers = sae_layers(sae)
    if max(layers) >= lm.n_layers:
        raise UserError(f"checkpoint layer {max(layers)} does not exist in {lm.name!r} "
                        f"({lm.n_layers} blocks)")


def sae_layers(sae: MLSAE) -> list[int]:
    layers = sae.config.get("layers")
    if not layers:
        raise UserError("the checkpoint's config.json lists no layers")
    return [int(v) for v in layers]


def eval_batches(sae: MLSAE, lm: LanguageModel, opts: TextOptions,
                 seed: int = 0) -> tuple[DataConfig, list[Tensor], int]:
    """Held-out (or --dataset) sequences as `[batch, ctx_len]` batches, and the token count.

    Fewer tokens than asked is not an error: the caller reports what was used."""
    cfg = run_data_config(sae, opts)
    source = TokenSource(cfg, lm.tokenizer, lm.eos_id, seed=seed)
    seqs = source.eval_sequences(opts.tokens)
    if len(seqs) == 0:
        raise UserError(f"no evaluation text: {cfg.eval_dataset or cfg.dataset!r} gives no "
                        f"sequence of {cfg.ctx_len} tokens")
    return cfg, list(batches(iter(seqs), opts.batch_size)), int(seqs.numel())
