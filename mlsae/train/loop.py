"""The training loop: activations in, one step per trainer, checkpoints out; and the held-out
summary after training.

`fit` takes a stream of `(x [layer, token, d_model], sequences)` (from the LM, `lm_stream`, or
an activation cache) and steps every trainer on each batch (one LM forward per batch however
many trainers a sweep has). Ctrl-C finishes the current step, saves and returns. Uses the
LM adapter, data, activations, metrics and the Trainer.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.distributed import ReduceOp
from tqdm.auto import tqdm

from mlsae.activations import LayerBatch, batch_activations, check_finite, layer_batch
from mlsae.config import RunConfig
from mlsae.data import TokenSource, batches, include_mask
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.metrics import ReconstructionStats
from mlsae.train.distributed import Dist, all_reduce_
from mlsae.train.trainer import Trainer

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; preemption (SLURM, k8s, torchrun)


class StopFlag:
    """Ctrl-C or SIGTERM sets the flag; the loop saves between steps. A second one aborts."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def set(self) -> bool:
        return self.signal is not None

    def __call__(self, sig, _frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.signal = sig
        name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
        tqdm.write(f"{name}: finishing this step, saving a checkpoint (again to abort)")

    def install(self) -> dict:
        """Handle STOP_SIGNALS (main thread only); returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self) for s in STOP_SIGNALS}


def agree_to_stop(stop: StopFlag, d_: Dist, device: torch.device) -> bool:
    """True on every rank if a stop signal reached ANY rank: one all-reduced flag per step, so
    all ranks leave the loop after the same step (a signal to one rank used to hang the job
    with the ranks waiting in different collectives)."""
    if not d_.enabled:
        return stop.set
    flag = torch.tensor([stop.signal or 0], device=device)
    all_reduce_(flag, d_, op=ReduceOp.MAX)
    if flag.item() and not stop.set:
        stop.signal = int(flag.item())
    return bool(flag.item())


def lm_stream(lm: LanguageModel, source: TokenSource, cfg: RunConfig, layers: list[int],
              start: int, device: torch.device, d_: Dist, index=None, apart: bool = False
              ) -> Iterator[tuple[Tensor | LayerBatch, int]]:
    """(x [layer, token, d_model] of this rank's sequences, sequences in the global batch);
    `apart`: a LayerBatch instead, for trainers on different layers (each takes its rows).

    `index`: the run's data_index.jsonl (resume points; written by rank 0 only). The first
    batch is read and checked eagerly, so an empty or all-excluded dataset fails before any
    run folder is written."""
    it = batches(source.train_sequences(start=start, index=index, record=d_.is_main),
                 cfg.train.batch_size)
    first = next(it)
    if start == 0 and not include_mask(first, lm.special_ids, cfg.data).any():
        raise UserError(f"--dataset {cfg.data.dataset!r}: every position of the first "
                        "batch is excluded (special tokens / --exclude-first)")

    def gen():
        for ids in itertools.chain([first], it):
            mine = ids[d_.rank::d_.world]
            if apart:
                yield layer_batch(lm, mine, layers, cfg.data, device), len(ids)
            else:
                yield batch_activations(lm, mine, layers, cfg.data, device)[0], len(ids)

    return gen()


def fit(trainers: list[Trainer], stream: Iterator[tuple[Tensor, int]],
        on_step: Callable[[Trainer], None] | None = None, progress: bool = True,
        stop: StopFlag | None = None) -> bool:
    """Train every trainer on the same activations (one LM forward per batch; from a
    LayerBatch each takes the rows of its own layers) to its token
    budget. Returns False if stopped early by Ctrl-C or SIGTERM (`stop.signal` says which;
    checkpoints saved, every rank at the same step), True when done."""
    lead = trainers[0]
    cfg, d_ = lead.cfg, lead.dist
    for tr in trainers:
        if d_.is_main:
            tr.run_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=lead.total_steps * lead.tokens_per_step, initial=lead.step *
               lead.tokens_per_step, unit="tok", unit_scale=True,
               disable=not progress or not d_.is_main, desc="train", dynamic_ncols=True)
    stop = stop or StopFlag()
    prev = stop.install()
    t0, tok0 = time.perf_counter(), 0
    stopping = False
    try:
        while lead.step < lead.total_steps and not stopping:
            x, n_seq = next(stream)
            if isinstance(x, Tensor):
                check_finite(x, "activations", lead.step)
            tok0 += n_seq * cfg.data.ctx_len
            bar.update(n_seq * cfg.data.ctx_len)
            rate = tok0 / (time.perf_counter() - t0)
            for tr in trainers:
                if isinstance(x, Tensor):
                    xi = x
                else:  # checked as the run alone checks it: after its own outlier rule
                    xi = x.select(tr.layers)
                    check_finite(xi, "activations", lead.step)
                m = tr.sae_step(xi.to(tr.device))
                tr.sequences += n_seq
                if m:
                    tr.log(m, rate)
            if m:
                bar.set_postfix(loss=f"{m['loss']:.3f}",
                                fvu=f"{sum(m['fvu']) / len(m['fvu']):.3f}",
                                dead=f"{m['dead_fraction']:.2f}")
            if on_step is not None:
                on_step(lead)
            stopping = agree_to_stop(stop, d_, lead.device)
            if lead.step % cfg.train.save_every == 0 and lead.step < lead.total_steps \
                    and not stopping:
                for tr in trainers:
                    tr.save()
    finally:
        bar.close()
        for tr in trainers:
            tr.close()
        for s, handler in prev.items():
            signal.signal(s, handler)
    for tr in trainers:
        tr.save()
    return not stopping


@torch.no_grad()
def heldout_summaries(trainers: list[Trainer], lm: LanguageModel, source: TokenSource,
                      max_tokens: int, progress: bool = True, lens=None) -> list[dict | None]:
    """Held-out FVU / MSE / L0 per layer for each trainer's SAE (exact float32 selection), on
    its own layers (one LM forward per batch for all). With a tuned `lens`
    (mlsae.lens.TunedLens) the SAE sees translated vectors and its reconstruction is mapped
    back exactly: the metrics are in the original space."""
    seqs = source.eval_sequences(max_tokens)
    lead = trainers[0]
    if len(seqs) == 0:
        return [None] * len(trainers)
    layers = sorted(set().union(*(tr.layers for tr in trainers)))
    stats = [ReconstructionStats(len(tr.layers), lm.d_model, tr.n_latents) for tr in trainers]
    for ids in tqdm(list(batches(iter(seqs), lead.cfg.train.batch_size)), desc="held-out",
                    disable=not progress, dynamic_ncols=True):
        batch = layer_batch(lm, ids, layers, lead.cfg.data, lead.device)
        views: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # a sweep's runs share one
        for tr, st in zip(trainers, stats):
            key = tuple(tr.layers)
            if key not in views:
                x = batch.select(tr.layers)
                views[key] = (x, x if lens is None else lens.translate(x, tr.layers))
            x, xs = views[key]
            if x.shape[1] == 0:
                continue
            for i in range(len(tr.layers)):  # one layer at a time: the summary's peak
                out = tr.sae(xs[i])          # memory stays below a training step's
                x_hat = out.x_hat
                if lens is not None:
                    x_hat = lens.inverse(x_hat[None], tr.layers[i:i + 1])[0]
                st.update_layer(i, x[i], x_hat, out.code.acts, out.code.idx)
            st.n += x.shape[1]
    return [dict(st.result(), layers=tr.layers, architecture=tr.sae.architecture,
                 active_rule=tr.sae.arch.active_rule(tr.sae)) if st.n else None
            for tr, st in zip(trainers, stats)]
