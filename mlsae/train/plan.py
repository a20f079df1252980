"""Run planning: what a `mlsae train` call trains and where, before anything is loaded.

A new run, a sweep (one child folder per combination) or a resume (flags checked against the
stored config); the checks that need no model (and those that need only its config); a run
trained from an activation cache takes the cache's model, layers, data settings and held-out
split. Uses config, data, the LM adapter's config checks, sweep and checkpoint names.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsae import config as C
from mlsae.config import RunConfig, arch_options
from mlsae.data.sources import BUILTIN_TEXT, python_version
from mlsae.data.split import resolve_prepend_bos
from mlsae.errors import UserError
from mlsae.lm import check_ctx_len, peek_config, resolve_dtype
from mlsae.train.checkpoint import CHECKPOINT, find_checkpoint
from mlsae.train.log_backends import parse as parse_log
from mlsae.train.sweep import parse_sweep, sweep_name, with_overrides

# Flags that may differ on --resume: they change how a run is watched, not what it computes.
RESUME_FREE = {"device", "threads", "log_every", "save_every", "eval_tokens", "out", "log"}


def default_run_dir(cfg: RunConfig) -> Path:
    name = Path(cfg.train.model).name.removesuffix(".gguf").replace("/", "_")
    arch = "" if cfg.sae.arch == "topk" else f"-{cfg.sae.arch}"
    return Path("runs") / f"{name}{arch}-x{cfg.sae.expansion_factor}-k{cfg.sae.k}"


def validate(cfg: RunConfig) -> None:
    """Checks that need no model; the rest happen once d_model is known."""
    arch_options(cfg.sae)  # a bad --arch is one line before anything loads
    if cfg.sae.expansion_factor <= 0:
        raise UserError(f"--expansion-factor must be positive, got {cfg.sae.expansion_factor}")
    if cfg.sae.k <= 0:
        raise UserError(f"--k must be positive, got {cfg.sae.k}")
    if cfg.train.tokens <= 0 or cfg.train.batch_size <= 0 or cfg.data.ctx_len <= 1:
        raise UserError("--tokens and --batch-size must be positive and --ctx-len at least 2")
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise UserError("--holdout-fraction must be in [0, 1)")
    if cfg.train.lr is not None and cfg.train.lr <= 0:
        raise UserError("--lr must be positive")
    if cfg.train.dtype != "auto":
        resolve_dtype(cfg.train.dtype)
    resolve_dtype(cfg.train.sae_matmul_dtype, "--sae-matmul-dtype")
    if not 0 <= cfg.train.lr_decay <= 1 or cfg.train.warmup_steps < 0:
        raise UserError("--lr-decay must be in [0, 1] and --warmup-steps >= 0")
    if not 0 <= cfg.data.exclude_first < cfg.data.ctx_len:
        raise UserError("--exclude-first must be >= 0 and below --ctx-len")
    if cfg.data.shuffle_buffer is not None and cfg.data.shuffle_buffer < 0:
        raise UserError("--shuffle-buffer must be >= 0 (0: stream order)")
    if cfg.data.exclude_outliers != 0 and not cfg.data.exclude_outliers > 1:
        raise UserError("--exclude-outliers must be 0 (off) or a factor above 1")
    parse_log(cfg.train.log)  # before the LM loads, not at the first metrics line


def read_run_config(run_dir: Path) -> RunConfig:
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--resume {str(run_dir)!r}: not a run folder (no checkpoint/state.json)")
    state_path = ckpt / "state.json"
    try:
        return RunConfig.from_dict(json.loads(state_path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--resume {str(run_dir)!r}: unreadable checkpoint/state.json ({e})") \
            from None


def merge_resume(stored: RunConfig, given: dict[str, object]) -> RunConfig:
    """Apply explicitly given flags to a stored config; any that changes the run is an error."""
    for section in (stored.sae, stored.data, stored.train):
        for name, value in given.items():
            if not hasattr(section, name):
                continue
            old = getattr(section, name)
            if name == "dtype" and value == "auto":  # the run recorded what auto meant
                continue
            if name in RESUME_FREE:
                setattr(section, name, value)
            elif old != value:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"--resume: {flag} {value!r} disagrees with the run's {old!r}")
    return stored


def plan_runs(cfg: RunConfig | None, resume, given: dict, sweep: str | None
              ) -> tuple[Path, list[tuple[RunConfig, Path]]]:
    """(run folder, [(config, child folder)]) for a new run, a sweep, or a resume."""
    if resume is not None:
        root = Path(resume)
        meta = root / "sweep.json"
        children = ([root / n for n in json.loads(meta.read_text())["runs"]]
                    if meta.is_file() else [root])
        return root, [(merge_resume(read_run_config(c), dict(given)), c) for c in children]
    cfg = cfg or RunConfig()
    root = Path(cfg.train.out) if cfg.train.out else default_run_dir(cfg)
    if sweep:
        if not cfg.train.out:
            root = root.with_name(root.name.rsplit("-x", 1)[0] + "-sweep")
        plan = [(with_overrides(cfg, o), root / sweep_name(o)) for o in parse_sweep(sweep)]
    else:
        plan = [(cfg, root)]
    for _, folder in plan:
        if (folder / CHECKPOINT).exists() or (folder / "sweep.json").exists():
            raise UserError(f"{str(folder)!r} already holds a run: use --resume {root} "
                            "or another --out")
    return root, plan


def adopt_cache_manifest(cfg: RunConfig, manifest: dict, given: dict | None = None) -> None:
    """A run trained from a cache takes the cache's model (its revision and blocks path),
    layers and data settings, its held-out split included (`holdout_fraction`,
    `eval_dataset`): the cache holds only train sequences of that split, so another split
    could score text the cache trained on. A different value given explicitly (`given`) is
    refused with one line."""
    layers = ",".join(map(str, manifest["layers"]))
    if cfg.train.layers not in ("all", layers):
        raise UserError(f"--layers {cfg.train.layers!r} disagrees with the activation cache's "
                        f"layers {layers}")
    for name in ("revision", "blocks"):  # the cache's LM
        if name not in manifest:  # an older cache did not record it: keep the run's
            continue
        value, cached = (given or {}).get(name, getattr(cfg.train, name)), manifest[name]
        if value is not None and value != cached:
            raise UserError(f"--{name} {value!r} disagrees with the activation cache's "
                            f"{cached!r} (the cache fixes the model)")
        setattr(cfg.train, name, cached)
    cfg.train.model, cfg.train.layers = manifest["model"], layers
    cached = C.from_dict(C.DataConfig, manifest["data"])
    for name in ("holdout_fraction", "eval_dataset", "exclude_outliers"):
        value = (given or {}).get(name, getattr(cached, name))
        if value != getattr(cached, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r} disagrees with the activation cache's "
                            f"{getattr(cached, name)!r} (the cache fixes the data and the "
                            "held-out split)")
    cfg.data = cached


def model_shape(cfg: RunConfig, lm=None) -> tuple[int, int]:
    """(n_layers, d_model) of the run's model, from its config alone when `lm` is None, after
    checking --ctx-len against the model's position limit."""
    config = lm.model.config if lm is not None else peek_config(cfg.train.model,
                                                                cfg.train.revision)
    check_ctx_len(config, cfg.data.ctx_len, cfg.train.model)
    if lm is not None:
        return lm.n_layers, lm.d_model
    return int(config.num_hidden_layers), int(config.hidden_size)


def settle_data(cfg: RunConfig, tokenizer=None) -> None:
    """Record what the data depends on beyond the flags: --prepend-bos resolved from the
    tokenizer's convention, and the Python version of the built-in `pydoc`/`python`/
    `python-source` text (a resumed run refuses another version: its text differs)."""
    d = cfg.data
    if d.prepend_bos is None and tokenizer is not None:
        d.prepend_bos = resolve_prepend_bos(d, tokenizer)
    if d.dataset in BUILTIN_TEXT or d.eval_dataset in BUILTIN_TEXT:
        now = python_version()
        if d.python_version is None:
            d.python_version = now
        elif d.python_version != now:
            raise UserError(f"--dataset {d.dataset!r} was read from Python "
                            f"{d.python_version}; this is Python {now}, whose text differs")
