"""Reading a trained run back: its SAE, its language model and its evaluation text.

Every command that reads text after training (eval, analyze, examples, ...) uses these so
that `--dataset/--tokens/--ctx-len` mean the same everywhere and the default is the run's
own held-out split. That split is defined on the run's own packing (its tokenizer, ctx_len
and BOS convention): with `--ctx-len` or `--model` overrides the run's held-out sequences
are re-created first, and the new windows are cut inside runs of consecutive held-out
sequences (decoded and re-tokenized for another tokenizer), so no override ever scores
trained-on text. Uses data, lm, sae and options; nothing above them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from mlsae.config import DataConfig, from_dict
from mlsae.data import TokenSource, batches
from mlsae.data.split import adds_bos
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, check_ctx_len, load_lm, load_tokenizer, resolve_device
from mlsae.options import TextOptions
from mlsae.runtime import resolve_lm_dtype
from mlsae.sae import MLSAE


def own_data_config(sae: MLSAE) -> DataConfig:
    """The DataConfig the run was trained with (old checkpoints: their recorded fields)."""
    run = sae.config.get("run", {})
    if "data" in run:
        return from_dict(DataConfig, run["data"])
    return from_dict(DataConfig, {"exclude_first": int(sae.config.get("exclude_first", 1)),
                                  "exclude_special": bool(sae.config.get("exclude_special",
                                                                         True))})


def run_data_config(sae: MLSAE, opts: TextOptions) -> DataConfig:
    """The run's DataConfig with overrides; a given --dataset becomes the eval dataset."""
    cfg = own_data_config(sae)
    over = {k: getattr(opts, k) for k in ("split", "text_column", "ctx_len")
            if getattr(opts, k) is not None}
    cfg = replace(cfg, **over)
    if opts.dataset is not None:
        cfg = replace(cfg, eval_dataset=opts.dataset)
    if cfg.ctx_len <= cfg.exclude_first:
        raise UserError(f"--ctx-len must exceed the excluded leading positions "
                        f"({cfg.exclude_first})")
    return cfg


LENS_COMMANDS = "eval, serve, compare, analyze, examples, features, report and mmcs"


def load_sae(path: str | Path, device: str = "cpu", lens_ok: bool = False,
             why: str | None = None) -> MLSAE:
    """A run's SAE. A run trained with `--lens` encodes TRANSLATED vectors (mlsae.lens):
    callers that apply the lens pass `lens_ok=True`; the others refuse such a run with one
    line (`why`: the reason, default "this command does not apply the lens") rather than
    report numbers for untranslated inputs."""
    sae = MLSAE.from_pretrained(path, device=device)
    if not lens_ok and ((sae.config.get("run") or {}).get("train") or {}).get("lens"):
        raise UserError(f"{str(path)!r} was trained with --lens: "
                        f"{why or 'this command does not apply the lens'} (mlsae "
                        f"{LENS_COMMANDS} do)")
    return sae


def load_run_lm(sae: MLSAE, opts: TextOptions) -> LanguageModel:
    """The run's LM (or --model), checked against the SAE's d_model and layers."""
    name = opts.model or sae.config.get("model")
    if not name:
        raise UserError("the checkpoint names no model: pass --model")
    train = sae.config.get("run", {}).get("train", {})
    own = opts.model is None or opts.model == sae.config.get("model")
    dtype = resolve_lm_dtype(opts.dtype, resolve_device(opts.device))  # `auto`, as training
    lm = load_lm(name, opts.device, dtype, train.get("revision") if own else None,
                 train.get("blocks") if own else None)
    check_lm_matches(sae, lm)
    return lm


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def expand_checkpoints(paths: Sequence[str | Path]) -> list[str]:
    """Checkpoints named on a command line: a sweep folder (`sweep.json`) stands for its runs,
    a folder that is no checkpoint itself but holds checkpoints (such as `<run>/baselines`,
    in any format `mlsae.formats` reads) for those, in natural order (layer_2 before
    layer_10); anything else (a checkpoint, a hub id) for itself. Each once, in order."""
    from mlsae.formats import detect

    out: list[str] = []
    for p in paths:
        folder = Path(p).expanduser()
        found = [str(p)]
        if (folder / "sweep.json").is_file():
            try:
                runs = json.loads((folder / "sweep.json").read_text())["runs"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{str(folder / 'sweep.json')!r}: not a sweep record") from None
            found = [str(folder / name) for name in runs]
        elif folder.is_dir() and not detect(folder):
            found = [str(c) for c in sorted((c for c in folder.iterdir()
                                             if c.is_dir() and detect(c)), key=_natural)]
            if not found:
                raise UserError(f"{str(p)!r} is neither a checkpoint nor a folder of "
                                "checkpoints")
        out += [c for c in found if c not in out]
    return out


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
        raise UserError("the checkpoint names no layers (a seed-paper or SAELens checkpoint "
                        "without a known model: convert it with `mlsae convert SRC --out DIR "
                        "--model M [--layers L]`)")
    return [int(v) for v in layers]


def eval_batches(sae: MLSAE, lm: LanguageModel, opts: TextOptions,
                 seed: int = 0) -> tuple[DataConfig, list[Tensor], int]:
    """Held-out (or --dataset) sequences as `[batch, ctx_len]` batches, and the token count.

    Fewer tokens than asked is not an error: the caller reports what was used."""
    cfg = run_data_config(sae, opts)
    check_ctx_len(lm.model.config, cfg.ctx_len, lm.name)
    own = own_data_config(sae)
    other_model = opts.model is not None and opts.model != sae.config.get("model")
    if opts.dataset is None and own.eval_dataset is None and (
            cfg.ctx_len != own.ctx_len or other_model):
        seqs = heldout_windows(sae, own, cfg, lm, opts.tokens, other_model, seed)
    else:
        seqs = TokenSource(cfg, lm.tokenizer, lm.eos_id, seed=seed).eval_sequences(opts.tokens)
    if len(seqs) == 0:
        raise UserError(f"no evaluation text: {cfg.eval_dataset or cfg.dataset!r} gives no "
                        f"sequence of {cfg.ctx_len} tokens")
    return cfg, list(batches(iter(seqs), opts.batch_size)), int(seqs.numel())


def heldout_windows(sae: MLSAE, own: DataConfig, cfg: DataConfig, lm: LanguageModel,
                    max_tokens: int, other_model: bool, seed: int = 0) -> Tensor:
    """`[n, cfg.ctx_len]` windows cut inside the run's own held-out text.

    The run's packing (its tokenizer, own.ctx_len, BOS) is re-created and its maximal runs of
    consecutive held-out sequences taken in order; for another model each run is split at
    EOS, decoded with the run's tokenizer and re-tokenized (EOS kept between documents).
    Windows never cross a run's ends, so every window is held-out text. A --ctx-len longer
    than the run's finds windows only where held-out sequences happen to be adjacent."""
    if other_model:
        train = sae.config.get("run", {}).get("train", {})
        run_tok = load_tokenizer(sae.config["model"], train.get("revision"))
        run_eos = getattr(run_tok, "eos_token_id", None)
        if run_eos is None:
            raise UserError(f"the run's tokenizer ({sae.config['model']!r}) has no EOS token")
        prepend = adds_bos(lm.tokenizer)
    else:
        run_tok, run_eos, prepend = lm.tokenizer, lm.eos_id, bool(cfg.prepend_bos)
    source = TokenSource(own, run_tok, run_eos, seed=seed)
    bos = lm.tokenizer.bos_token_id if prepend else None
    if prepend and bos is None:
        raise UserError("--prepend-bos: the tokenizer has no BOS token")
    body = cfg.ctx_len - (1 if bos is not None else 0)
    n_max = max(1, int(max_tokens) // cfg.ctx_len)
    out: list[Tensor] = []
    for run in source.heldout_runs():
        if source.bos_id is not None:  # drop the run's own BOS at each sequence start
            run = run.view(-1, own.ctx_len)[:, 1:].reshape(-1)
        ids = run.tolist()
        if other_model:
            ids = _retokenize(ids, run_tok, run_eos, lm.tokenizer, lm.eos_id)
        for k in range(0, len(ids) - body + 1, body):
            window = ids[k:k + body]
            out.append(torch.tensor(([bos] if bos is not None else []) + window))
            if len(out) == n_max:
                return torch.stack(out)
    return torch.stack(out) if out else torch.empty(0, cfg.ctx_len, dtype=torch.long)


def _retokenize(ids: list[int], src_tok, src_eos: int, dst_tok, dst_eos: int) -> list[int]:
    out: list[int] = []
    seg: list[int] = []
    for t in ids + [None]:
        if t is None or t == src_eos:
            if seg:
                text = src_tok.decode(seg)
                out.extend(dst_tok(text, add_special_tokens=False)["input_ids"])
            if t is not None:
                out.append(dst_eos)
            seg = []
        else:
            seg.append(t)
    return out
