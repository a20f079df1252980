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
from tqdm.auto import tqdm

from mlsae.activations import batch_activations, check_finite
from mlsae.config import RunConfig
from mlsae.data import TokenSource, batches, include_mask
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.metrics import ReconstructionStats
from mlsae.train.distributed import Dist
from mlsae.train.trainer import Trainer


class StopFlag:
    """Ctrl-C sets the flag; the loop saves between steps. A second Ctrl-C aborts."""

    def __init__(self):
        self.set = False

    def __call__(self, _sig, _frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)")


def lm_stream(lm: LanguageModel, source: TokenSource, cfg: RunConfig, layers: list[int],
              start: int, device: torch.device, d_: Dist) -> Iterator[tuple[Tensor, int]]:
    """(x [layer, token, d_model] of this rank's sequences, sequences in the global batch).

    The first batch is read and checked eagerly, so an empty or all-excluded dataset fails
    before any run folder is written."""
    it = batches(source.train_sequences(start=start), cfg.train.batch_size)
    first = next(it)
    if start == 0 and not include_mask(first, lm.special_ids, cfg.data).any():
        raise UserError(f"--dataset {cfg.data.dataset!r}: every position of the first "
                        "batch is excluded (special tokens / --exclude-first)")

    def gen():
        for ids in itertools.chain([first], it):
            x, _ = batch_activations(lm, ids[d_.rank::d_.world], layers, cfg.data, device)
            yield x, len(ids)

    return gen()


def fit(trainers: list[Trainer], stream: Iterator[tuple[Tensor, int]],
        on_step: Callable[[Trainer], None] | None = None, progress: bool = True) -> bool:
    """Train every trainer on the same activations (one LM forward per batch) to its token
    budget. Returns False if stopped early by Ctrl-C (checkpoints saved), True when done."""
    lead = trainers[0]
    cfg, d_ = lead.cfg, lead.dist
    for tr in trainers:
        if d_.is_main:
            tr.run_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=lead.total_steps * lead.tokens_per_step, initial=lead.step *
               lead.tokens_per_step, unit="tok", unit_scale=True,
               disable=not progress or not d_.is_main, desc="train", dynamic_ncols=True)
    stop = StopFlag()
    in_main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGINT, stop) if in_main else None
    t0, tok0 = time.perf_counter(), 0
    try:
        while lead.step < lead.total_steps and not stop.set:
            x, n_seq = next(stream)
            check_finite(x, "activations", lead.step)
            tok0 += n_seq * cfg.data.ctx_len
            bar.update(n_seq * cfg.data.ctx_len)
            rate = tok0 / (time.perf_counter() - t0)
            for tr in trainers:
                m = tr.sae_step(x.to(tr.device))
                tr.sequences += n_seq
                if m:
                    tr.log(m, rate)
            if m:
                bar.set_postfix(loss=f"{m['loss']:.3f}",
                                fvu=f"{sum(m['fvu']) / len(m['fvu']):.3f}",
                                dead=f"{m['dead_fraction']:.2f}")
            if on_step is not None:
                on_step(lead)
            if lead.step % cfg.train.save_every == 0 and lead.step < lead.total_steps:
                for tr in trainers:
                    tr.save()
    finally:
        bar.close()
        for tr in trainers:
            tr.close()
        if prev is not None:
            signal.signal(signal.SIGINT, prev)
    for tr in trainers:
        tr.save()
    return not stop.set


@torch.no_grad()
def heldout_summaries(trainers: list[Trainer], lm: LanguageModel, source: TokenSource,
                      max_tokens: int, progress: bool = True) -> list[dict | None]:
    """Held-out FVU / MSE / L0 per layer for each trainer's SAE (exact float32 selection)."""
    seqs = source.eval_sequences(max_tokens)
    lead = trainers[0]
    if len(seqs) == 0:
        return [None] * len(trainers)
    stats = [ReconstructionStats(len(lead.layers), lm.d_model, tr.n_latents) for tr in trainers]
    for ids in tqdm(list(batches(iter(seqs), lead.cfg.train.batch_size)), desc="held-out",
                    disable=not progress, dynamic_ncols=True):
        x, _ = batch_activations(lm, ids, lead.layers, lead.cfg.data, lead.device)
        if x.shape[1] == 0:
            continue
        shape = (len(lead.layers), x.shape[1], -1)
        for tr, st in zip(trainers, stats):
            out = tr.sae(x.reshape(-1, x.shape[-1]))
            st.update(x, out.x_hat.reshape(shape), out.code.acts.reshape(shape),
                      out.code.idx.reshape(shape))
    return [dict(st.result(), layers=lead.layers) if st.n else None for st in stats]
