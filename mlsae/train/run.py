"""`train()`: plan the run(s), load the LM (or open an activation cache), build one Trainer per
run, fit them on one activation stream, and write the held-out summary.

Uses everything in mlsae.train, the LM adapter, data and the activation cache.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from mlsae import config as C
from mlsae.activations.cache import CachedActivations
from mlsae.config import RunConfig
from mlsae.data import TokenSource
from mlsae.errors import UserError
from mlsae.lens import run_lens
from mlsae.lm import LanguageModel, cast_lm, load_lm, resolve_device
from mlsae.runtime import freed_memory_kept, resolve_lm_dtype
from mlsae.train.checkpoint import CHECKPOINT
from mlsae.train.distributed import barrier, init_from_env
from mlsae.train.loop import StopFlag, fit, heldout_summaries, lm_stream
from mlsae.train.plan import adopt_cache_manifest, model_shape, plan_runs, settle_data, validate
from mlsae.train.trainer import Trainer


def train(cfg: RunConfig | None = None, resume: str | os.PathLike | None = None,
          given: dict | None = None, lm: LanguageModel | None = None,
          on_step: Callable[[Trainer], None] | None = None, progress: bool = True,
          sweep: str | None = None) -> dict:
    """Train (or resume) a run, or a sweep of runs sharing one LM forward per batch.

    Returns {"run_dir", "runs", "finished", "stopped_by" (None, "SIGINT" or "SIGTERM"),
    "summary", "summaries", "trainer", "trainers"}.
    `given` are explicitly set options (checked against a resumed run's config); `lm` lets a
    caller pass an already loaded model (tests, benchmarks). While it runs, glibc malloc
    keeps freed memory for reuse (`mlsae.runtime.freed_memory_kept`).
    """
    with freed_memory_kept():
        return _train(cfg, resume, given, lm, on_step, progress, sweep)


def train_apart(plan: list[tuple[RunConfig, str | os.PathLike]], index: str | os.PathLike,
                lm: LanguageModel | None = None, progress: bool = True,
                resume: bool = False, on_step: Callable[[Trainer], None] | None = None
                ) -> dict:
    """Train several runs that differ only in their layers (the single-layer baselines of
    `mlsae baselines`) on one LM forward per batch: each run gets exactly what it would get
    alone (its layers' rows, its own outlier rule, its own seed), at the cost of one run.

    `plan`: [(config, run folder)], new runs, or with `resume` runs interrupted at the same
    step (their stored configs); `index`: the shared data_index.jsonl (resume points of the
    one data stream they all read). Returns what `train` returns; every run folder is an
    ordinary one (`--resume` works on each)."""
    plan = [(c, Path(folder)) for c, folder in plan]
    lead = plan[0][0]
    for c, folder in plan:
        if _without_layers(c) != _without_layers(lead):
            raise UserError(f"{str(folder)!r}: runs trained apart must agree on everything "
                            "but their layers")
        if c.train.lens:
            raise UserError(f"{str(folder)!r}: runs trained apart cannot take a tuned lens")
        if not resume and (folder / CHECKPOINT).exists():
            raise UserError(f"{str(folder)!r} already holds a run")
    with freed_memory_kept():
        return _train_plan(Path(index).parent, plan, resume, lm, on_step, progress, None,
                           index=Path(index))


def train_plan(plan: list[tuple[RunConfig, str | os.PathLike]], root: str | os.PathLike,
               lm: LanguageModel | None = None, progress: bool = True, resume: bool = False
               ) -> dict:
    """Train several runs that read the same text (same data, model and token budget) but may
    differ in anything else, layers and SAE alike (`mlsae pareto`: a sweep of architectures
    plus their single-layer baselines), on one LM forward per batch. `root`: the folder of
    the shared data_index.jsonl; `resume`: runs interrupted at the same step. Returns what
    `train` returns."""
    plan = [(c, Path(folder)) for c, folder in plan]
    lead = plan[0][0]
    for c, folder in plan:
        if (c.data, c.train.model, c.train.tokens, c.train.batch_size, c.train.seed) != (
                lead.data, lead.train.model, lead.train.tokens, lead.train.batch_size,
                lead.train.seed):
            raise UserError(f"{str(folder)!r}: runs trained together must read the same text")
        if not resume and (folder / CHECKPOINT).exists():
            raise UserError(f"{str(folder)!r} already holds a run")
    with freed_memory_kept():
        return _train_plan(Path(root), plan, resume, lm, None, progress, None,
                           index=Path(root) / "data_index.jsonl")


def _without_layers(cfg: RunConfig) -> dict:
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("layers", "out")}
    return d


def _train(cfg, resume, given, lm, on_step, progress, sweep) -> dict:
    root, plan = plan_runs(cfg, resume, given or {}, sweep)
    return _train_plan(root, plan, resume is not None, lm, on_step, progress, sweep, given)


def _train_plan(root, plan, resume, lm, on_step, progress, sweep, given=None,
                index=None) -> dict:
    for c, _ in plan:
        validate(c)
    lead = plan[0][0]
    if lead.train.threads:
        torch.set_num_threads(lead.train.threads)
    device = resolve_device(lead.train.device)
    dist_info, device = init_from_env(device)
    for c, _ in plan:
        c.train.dtype = resolve_lm_dtype(c.train.dtype, device)
    if lead.train.batch_size % dist_info.world:
        raise UserError(f"--batch-size {lead.train.batch_size} is not divisible by the "
                        f"{dist_info.world} ranks")
    cache = None
    if lead.train.activations:
        cache = CachedActivations(lead.train.activations, lead.train.cache_shuffle,
                                  lead.train.seed)
        for c, _ in plan:
            adopt_cache_manifest(c, cache.manifest, given)
        n_layers, d_model = cache.manifest["n_lm_layers"], cache.manifest["d_model"]
    else:  # from the model's config alone: fail on bad flags before loading
        n_layers, d_model = model_shape(lead, lm)
    own_layers = [C.resolve_layers(c.train.layers, n_layers) for c, _ in plan]
    layers = sorted(set().union(*own_layers))  # what the stream carries
    apart = any(ls != layers for ls in own_layers)  # runs on different layers
    for c, _ in plan:
        if c.sae.k > c.sae.expansion_factor * d_model:
            raise UserError(f"--k {c.sae.k} exceeds n_latents {c.sae.expansion_factor * d_model}")
    score_lm = None  # float32, for the held-out summary (issue 15: score float32 activations)
    if lm is None and cache is None:
        score_lm = load_lm(lead.train.model, str(device), "float32", lead.train.revision,
                           lead.train.blocks)
        lm = cast_lm(score_lm, lead.train.dtype, lead.train.blocks)
    for c, _ in plan:
        settle_data(c, lm.tokenizer if lm is not None else None)
    trainers = [Trainer(c, d_model, ls, folder, device, dist_info)
                for (c, folder), ls in zip(plan, own_layers)]
    if resume:
        for tr in trainers:
            tr.load()
        if len({(tr.step, tr.sequences) for tr in trainers}) > 1:
            raise UserError(f"--resume {str(root)!r}: the sweep's runs stopped at different "
                            "steps; resume each run folder on its own")
    elif sweep and dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.json").write_text(json.dumps(
            {"sweep": sweep, "runs": [f.name for _, f in plan]}, indent=2) + "\n")
    lens = run_lens(trainers[0].run_dir, lead.train.lens, layers, d_model)  # None: no lens
    start = trainers[0].sequences
    if cache is not None:
        stream = cache.batches(lead.train.batch_size, start, dist_info.rank, dist_info.world)
    else:
        source = TokenSource(lead.data, lm.tokenizer, lm.eos_id, seed=lead.train.seed)
        stream = lm_stream(lm, source, lead, layers, start, device, dist_info,
                           index=index or root / "data_index.jsonl", apart=apart)
    if lens is not None:  # the SAE encodes translated vectors (mlsae.lens)
        stream = lens.translate_stream(stream, layers)
        for tr in trainers if dist_info.is_main else []:
            lens.save(tr.run_dir / "lens")
    stop = StopFlag()
    finished = fit(trainers, stream, on_step=on_step, progress=progress, stop=stop)
    summaries: list[dict | None] = [None] * len(trainers)
    synthetic = cache is not None and "synthetic" in cache.manifest  # no LM: `mlsae synth-score`
    if finished and lead.train.eval_tokens > 0 and dist_info.is_main and not synthetic:
        del stream
        if score_lm is not None:  # the float32 model training's copy was cast from
            lm = score_lm
        elif lm is None:  # trained from a cache: the held-out check still needs the LM
            lm = load_lm(lead.train.model, str(device), "float32", lead.train.revision,
                         lead.train.blocks)
        source = TokenSource(lead.data, lm.tokenizer, lm.eos_id, seed=lead.train.seed)
        summaries = heldout_summaries(trainers, lm, source, int(lead.train.eval_tokens),
                                      progress=progress, lens=lens)
        for tr, summary in zip(trainers, summaries):
            if summary is not None:
                (tr.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    barrier(dist_info)
    return {"run_dir": root, "runs": [tr.run_dir for tr in trainers], "finished": finished,
            "stopped_by": None if stop.signal is None else signal.Signals(stop.signal).name,
            "summary": summaries[0], "summaries": summaries, "trainer": trainers[0],
            "trainers": trainers}
