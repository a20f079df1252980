"""The Trainer: one SAE with its optimizer, learning-rate schedule, dead-latent counters,
metrics log and checkpoints. It never sees the LM: it takes activations
`[layer, token, d_model]`, so several trainers can share one LM forward (sweeps).

Uses config, the SAE, the loss, checkpoint I/O and the distributed glue.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from mlsae import config as C
from mlsae.activations import check_finite
from mlsae.errors import UserError
from mlsae.lm import resolve_dtype
from mlsae.sae import MLSAE, geometric_median
from mlsae.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from mlsae.train.distributed import Dist, all_gather_rows, all_reduce_
from mlsae.train.log_backends import open_backends
from mlsae.train.loss import loss, update_dead_counters


def checkpoint_meta(cfg: C.RunConfig, layers: list[int], lr: float, auxk: int,
                    dead_tokens: int) -> dict:
    """The SAE config.json's keys beyond the SAE's own shape (docs/guides/training.md,
    "What a run writes")."""
    t = cfg.train
    return {"model": t.model, "layers": layers, "hook_point": "resid_post",
            "exclude_first": cfg.data.exclude_first,
            "exclude_special": cfg.data.exclude_special,
            "expansion_factor": cfg.sae.expansion_factor, "lm_dtype": t.dtype,
            "lr": lr, "auxk": auxk, "dead_tokens_effective": dead_tokens, "run": cfg.to_dict()}


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the lines of a metrics.jsonl up to `last_step` (rewritten atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class Trainer:
    """One SAE with its optimizer and counters, stepping on `[layer, token, d_model]`."""

    def __init__(self, cfg: C.RunConfig, d_model: int, layers: list[int], run_dir: Path,
                 device: torch.device, dist: Dist | None = None):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.dist = dist or Dist()
        t = cfg.train
        self.layers = layers
        self.n_latents = cfg.sae.expansion_factor * d_model
        if cfg.sae.k > self.n_latents:
            raise UserError(f"--k {cfg.sae.k} exceeds n_latents {self.n_latents} "
                            f"(expansion_factor {cfg.sae.expansion_factor} x d_model {d_model})")
        self.lr = t.lr if t.lr is not None else C.default_lr(self.n_latents)
        self.auxk = min(t.auxk if t.auxk is not None else d_model // 2, self.n_latents)
        self.tokens_per_step = t.batch_size * cfg.data.ctx_len
        self.total_steps = math.ceil(t.tokens / self.tokens_per_step)
        self.dead_tokens = int(min(t.dead_tokens, max(t.tokens / 10, 1)))
        self.matmul_dtype = resolve_dtype(t.sae_matmul_dtype, "--sae-matmul-dtype")
        self.rng = torch.Generator().manual_seed(t.seed)  # the run's only random stream
        meta = checkpoint_meta(cfg, layers, self.lr, self.auxk, self.dead_tokens)
        opts = C.arch_options(cfg.sae)
        if "threshold_lr" in opts and opts["threshold_lr"] is None:
            opts["threshold_lr"] = C.default_threshold_lr(self.total_steps)
        self.sae = MLSAE(d_model, self.n_latents, cfg.sae.k, cfg.sae.standardize,
                         cfg.sae.eps, config=meta, architecture=cfg.sae.arch,
                         arch_options=opts)
        self.sae.reset_parameters(self.rng)
        self.sae.to(device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.long)
        self.step = 0
        self.tokens_seen = 0  # included (trained-on) tokens, all ranks
        self.sequences = 0  # data position in the global train stream
        self.log_file = None

    # ---- one step ------------------------------------------------------------------------
    def sae_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on `x [layer, token, d_model]` (this rank's share)."""
        if self.step == 0:
            self.init_b_dec(x)
        dead = self.tokens_since_fired >= self.dead_tokens
        out = loss(self.sae, x, dead, self.dist, self.auxk, self.cfg.train.auxk_coef,
                   self.matmul_dtype, self.penalty_coef(self.step))
        if out is None:
            return {}
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        check_finite(torch.cat([out.err, torch.tensor([out.aux_loss], dtype=out.err.dtype,
                                                      device=out.err.device)]),
                     "loss", self.step)
        if self.dist.enabled:
            for p in self.sae.parameters():
                all_reduce_(p.grad, self.dist)
        self.sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.step()
        self.sae.normalize_decoder()
        self.sae.arch.after_step(self.sae, out.min_kept)
        update_dead_counters(self.tokens_since_fired, out.fired, out.n_tokens)
        self.step += 1
        self.tokens_seen += out.n_tokens
        fvu = out.fvu
        return {"loss": sum(fvu) / len(fvu) + self.cfg.train.auxk_coef * out.aux_loss
                + out.extra,
                "fvu": fvu, "l0": (out.l0 / out.n_tokens).tolist(), "auxk_loss": out.aux_loss,
                "dead_fraction": int(dead.sum()) / self.n_latents}

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """b_dec = geometric median of the first global batch, all layers pooled."""
        xt, _, _ = self.sae.preprocess(all_gather_rows(x.reshape(-1, x.shape[-1]), self.dist))
        self.sae.b_dec.copy_(geometric_median(xt))
        self.sae.arch.init_from_batch(self.sae, xt)

    def penalty_coef(self, step: int) -> float:
        """The sparsity penalty's weight at `step` (JumpReLU's `l0_coef`, rising linearly over
        the first `l0_warmup` fraction of the steps); 0 for the other architectures."""
        opts = self.sae.arch.opts
        if "l0_coef" not in opts:
            return 0.0
        warm = float(opts.get("l0_warmup", 0)) * self.total_steps
        return float(opts["l0_coef"]) * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        scale = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        decay_steps = t.lr_decay * self.total_steps
        if decay_steps > 0:
            scale *= min(1.0, (self.total_steps - step) / decay_steps)
        return self.lr * scale

    # ---- metrics.jsonl -------------------------------------------------------------------
    def log(self, m: dict, rate: float) -> None:
        if not self.dist.is_main:
            return
        if getattr(self, "backends", None) is None:  # --log: TensorBoard / W&B besides JSONL
            self.backends = open_backends(self.cfg.train.log, self.run_dir, self.cfg.to_dict())
        if self.step % self.cfg.train.log_every and self.step != self.total_steps:
            return
        if self.log_file is None:
            self.log_file = (self.run_dir / "metrics.jsonl").open("a")
        row = {"step": self.step, "tokens": self.tokens_seen, "lr": self.lr_at(self.step - 1),
               "tokens_per_s": rate, "loss": m["loss"], "fvu_mean": sum(m["fvu"]) / len(m["fvu"]),
               "auxk_loss": m["auxk_loss"], "dead_fraction": m["dead_fraction"],
               "layers": self.layers, "fvu": m["fvu"], "l0": m["l0"]}
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()
        for backend in self.backends:
            backend.write(row)

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        for backend in getattr(self, "backends", None) or []:
            backend.close()
        self.backends = None

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        """Write checkpoint/ atomically (rank 0 only)."""
        if not self.dist.is_main:
            return
        state = {"step": self.step, "tokens_seen": self.tokens_seen,
                 "sequences": self.sequences, "total_steps": self.total_steps,
                 "finished": self.step >= self.total_steps, "config": self.cfg.to_dict()}
        save_checkpoint(self.run_dir, self.sae, self.opt,
                        {"tokens_since_fired": self.tokens_since_fired,
                         "rng": self.rng.get_state()}, state)

    def load(self, ckpt: Path | None = None) -> None:
        """Restore from the run's checkpoint; metrics.jsonl loses any line logged after it (a
        crash after a log line and before the next checkpoint would otherwise repeat steps)."""
        tensors, state = load_checkpoint(ckpt or self.run_dir / CHECKPOINT, self.sae,
                                         self.opt, self.device)
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.rng.set_state(tensors["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.sequences = state["sequences"]
        if self.dist.is_main:
            truncate_log(self.run_dir / "metrics.jsonl", self.step)
