"""Training loop: LM forward -> resid_post of every chosen layer -> one TopK SAE step.

A run folder holds:
  config.json, model.safetensors   the latest SAE checkpoint (SPEC §3 format)
  checkpoint/                      everything needed to resume, written atomically:
      config.json, model.safetensors, optimizer.safetensors, state.safetensors, state.json
  metrics.jsonl                    one JSON line every --log-every steps
  summary.json                     held-out per-layer FVU / MSE / L0 after training
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations import batch_activations, check_finite
from mlsae.data import TokenSource, batches
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, load_lm, peek_shape, resolve_device, resolve_dtype
from mlsae.metrics import ReconstructionStats
from mlsae.sae import MLSAE, geometric_median, replace_dir, sparse_decode

# Flags that may differ on --resume: they change how a run is watched, not what it computes.
RESUME_FREE = {"device", "threads", "log_every", "save_every", "eval_tokens", "out"}


@dataclass
class RunConfig:
    sae: C.SAEConfig = field(default_factory=C.SAEConfig)
    data: C.DataConfig = field(default_factory=C.DataConfig)
    train: C.TrainConfig = field(default_factory=C.TrainConfig)

    def to_dict(self) -> dict:
        return {"sae": C.to_dict(self.sae), "data": C.to_dict(self.data),
                "train": C.to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(C.from_dict(C.SAEConfig, d["sae"]), C.from_dict(C.DataConfig, d["data"]),
                   C.from_dict(C.TrainConfig, d["train"]))


def default_run_dir(cfg: RunConfig) -> Path:
    name = Path(cfg.train.model).name.removesuffix(".gguf").replace("/", "_")
    return Path("runs") / f"{name}-x{cfg.sae.expansion_factor}-k{cfg.sae.k}"


def validate(cfg: RunConfig) -> None:
    """Checks that need no model; the rest happen once d_model is known."""
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
    resolve_dtype(cfg.train.dtype)
    resolve_dtype(cfg.train.sae_matmul_dtype, "--sae-matmul-dtype")
    if not 0 <= cfg.train.lr_decay <= 1 or cfg.train.warmup_steps < 0:
        raise UserError("--lr-decay must be in [0, 1] and --warmup-steps >= 0")
    if not 0 <= cfg.data.exclude_first < cfg.data.ctx_len:
        raise UserError("--exclude-first must be >= 0 and below --ctx-len")


class Trainer:
    """Owns the SAE, the optimizer and the counters; `fit` runs to the token budget."""

    def __init__(self, cfg: RunConfig, lm: LanguageModel, run_dir: Path):
        self.cfg, self.lm, self.run_dir = cfg, lm, run_dir
        t = cfg.train
        self.layers = C.resolve_layers(t.layers, lm.n_layers)
        d_model = lm.d_model
        self.n_latents = cfg.sae.expansion_factor * d_model
        if cfg.sae.k > self.n_latents:
            raise UserError(f"--k {cfg.sae.k} exceeds n_latents {self.n_latents} "
                            f"(expansion_factor {cfg.sae.expansion_factor} x d_model {d_model})")
        self.device = resolve_device(t.device)
        self.lr = t.lr if t.lr is not None else C.default_lr(self.n_latents)
        self.auxk = min(t.auxk if t.auxk is not None else d_model // 2, self.n_latents)
        self.tokens_per_step = t.batch_size * cfg.data.ctx_len
        self.total_steps = math.ceil(t.tokens / self.tokens_per_step)
        self.dead_tokens = int(min(t.dead_tokens, max(t.tokens / 10, 1)))
        meta = {"model": t.model, "layers": self.layers, "hook_point": "resid_post",
                "exclude_first": cfg.data.exclude_first,
                "exclude_special": cfg.data.exclude_special,
                "expansion_factor": cfg.sae.expansion_factor, "lm_dtype": t.dtype,
                "lr": self.lr, "auxk": self.auxk, "dead_tokens_effective": self.dead_tokens,
                "run": cfg.to_dict()}
        self.rng = torch.Generator().manual_seed(t.seed)  # the run's only random stream
        self.sae = MLSAE(d_model, self.n_latents, cfg.sae.k, cfg.sae.standardize,
                         cfg.sae.eps, config=meta)
        self.sae.reset_parameters(self.rng)
        self.sae.to(self.device)
        self.sae.matmul_dtype = resolve_dtype(t.sae_matmul_dtype, "--sae-matmul-dtype")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.long)
        self.step = 0
        self.tokens_seen = 0  # included (trained-on) tokens
        self.sequences = 0  # data position
        self.source = TokenSource(cfg.data, lm.tokenizer, lm.eos_id, seed=t.seed)
        self._stop = False

    # ---- one step ------------------------------------------------------------------------
    def train_step(self, input_ids: torch.Tensor) -> dict:
        x, _ = batch_activations(self.lm, input_ids, self.layers, self.cfg.data, self.device)
        check_finite(x, "activations", self.step)
        n_layers, n_tok, d = x.shape
        if n_tok == 0:
            return {}
        if self.step == 0:
            with torch.no_grad():
                xt, _, _ = self.sae._standardize(x.reshape(-1, d))
                self.sae.b_dec.copy_(geometric_median(xt))
        dead = self.tokens_since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        out = self.sae(x.reshape(-1, d), dead=dead.to(self.device) if n_dead else None,
                       auxk=self.auxk)
        x_hat = out.x_hat.reshape(n_layers, n_tok, d)
        err = (x_hat - x).pow(2).sum(dim=(1, 2))
        var = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
        fvu = err / var.clamp_min(1e-12)  # [layer]
        loss = fvu.mean()
        aux_loss = torch.zeros((), device=self.device)
        if out.aux_acts is not None:
            # Dead latents reconstruct the residual error in standardized space (Gao et al.).
            e = ((x.reshape(-1, d) - out.x_hat) / (out.code.std + self.sae.eps)).detach()
            e_hat = sparse_decode(out.aux_acts, out.aux_idx, self.sae.W_dec)
            aux_loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
            aux_loss = aux_loss * min(n_dead / self.auxk, 1.0)
            loss = loss + self.cfg.train.auxk_coef * aux_loss
        check_finite(loss.detach(), "loss", self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.step()
        self.sae.normalize_decoder()

        with torch.no_grad():
            acts, idx = out.code.acts, out.code.idx
            fired = torch.zeros(self.n_latents, dtype=torch.bool, device=self.device)
            fired[idx[acts > 1e-3]] = True
            self.tokens_since_fired += n_tok
            self.tokens_since_fired[fired.cpu()] = 0
            l0 = (acts > 0).reshape(n_layers, n_tok, -1).sum(-1).float().mean(1)
        self.step += 1
        self.tokens_seen += n_tok
        return {"loss": loss.item(), "fvu": fvu.tolist(), "l0": l0.tolist(),
                "auxk_loss": aux_loss.item(), "dead_fraction": n_dead / self.n_latents}

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        scale = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        decay_steps = t.lr_decay * self.total_steps
        if decay_steps > 0:
            scale *= min(1.0, (self.total_steps - step) / decay_steps)
        return self.lr * scale

    # ---- loop ----------------------------------------------------------------------------
    def fit(self, on_step: Callable[[Trainer], None] | None = None, progress: bool = True) -> bool:
        """Train to the token budget. Returns False if stopped early by Ctrl-C (checkpoint
        saved), True when finished."""
        t = self.cfg.train
        it = batches(self.source.train_sequences(start=self.sequences), t.batch_size)
        # Read the first batch before writing anything: an empty or all-excluded dataset
        # must fail without leaving a half-made run folder.
        first = next(it)
        if self.step == 0:
            self._check_batch(first)
        it = itertools.chain([first], it)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=self.total_steps * self.tokens_per_step, initial=self.step *
                   self.tokens_per_step, unit="tok", unit_scale=True, disable=not progress,
                   desc="train", dynamic_ncols=True)
        prev = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        t0, tok0 = time.perf_counter(), 0
        try:
            while self.step < self.total_steps and not self._stop:
                ids = next(it)
                m = self.train_step(ids)
                self.sequences += len(ids)
                tok0 += ids.numel()
                bar.update(ids.numel())
                if not m:
                    continue
                rate = tok0 / (time.perf_counter() - t0)
                fvu_mean = sum(m["fvu"]) / len(m["fvu"])
                bar.set_postfix(loss=f"{m['loss']:.3f}", fvu=f"{fvu_mean:.3f}",
                                dead=f"{m['dead_fraction']:.2f}", tok_s=f"{rate:.0f}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    row = {"step": self.step, "tokens": self.tokens_seen,
                           "lr": self.lr_at(self.step - 1), "tokens_per_s": rate,
                           "loss": m["loss"], "fvu_mean": fvu_mean,
                           "auxk_loss": m["auxk_loss"], "dead_fraction": m["dead_fraction"],
                           "layers": self.layers, "fvu": m["fvu"], "l0": m["l0"]}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if on_step is not None:
                    on_step(self)
                if self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save()
        finally:
            bar.close()
            log.close()
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
        self.save()
        return not self._stop

    def _check_batch(self, ids: torch.Tensor) -> None:
        from mlsae.data import include_mask

        if not include_mask(ids, self.lm.special_ids, self.cfg.data).any():
            raise UserError(f"--dataset {self.cfg.data.dataset!r}: every position of the first "
                            "batch is excluded (special tokens / --exclude-first)")

    def _on_sigint(self, _sig, _frame) -> None:
        if self._stop:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)")

    def request_stop(self) -> None:
        self._stop = True

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        """Write checkpoint/ atomically, then point the run folder's model files at it."""
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=self.run_dir))
        try:
            self.sae.write_files(tmp)
            opt_tensors = {}
            names = {id(p): n for n, p in self.sae.named_parameters()}
            for group in self.opt.param_groups:
                for p in group["params"]:
                    for key, v in self.opt.state.get(p, {}).items():
                        opt_tensors[f"{names[id(p)]}.{key}"] = v.detach().cpu().reshape(
                            v.shape if v.dim() else (1,)).contiguous()
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({"tokens_since_fired": self.tokens_since_fired,
                       "rng": self.rng.get_state()}, str(tmp / "state.safetensors"))
            state = {"step": self.step, "tokens_seen": self.tokens_seen,
                     "sequences": self.sequences, "total_steps": self.total_steps,
                     "finished": self.step >= self.total_steps, "config": self.cfg.to_dict()}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            ckpt = self.run_dir / "checkpoint"
            replace_dir(tmp, ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for name in ("model.safetensors", "config.json"):
            link = self.run_dir / f".{name}.tmp"
            link.unlink(missing_ok=True)
            os.link(ckpt / name, link)
            os.replace(link, self.run_dir / name)

    def load(self, ckpt: Path) -> None:
        sae = MLSAE.from_pretrained(ckpt)
        with torch.no_grad():
            for n, p in self.sae.named_parameters():
                p.copy_(getattr(sae, n))
        try:
            opt_t = load_file(str(ckpt / "optimizer.safetensors"))
            st = load_file(str(ckpt / "state.safetensors"))
            state = json.loads((ckpt / "state.json").read_text())
        except Exception as e:
            raise UserError(f"--resume {str(ckpt.parent)!r}: checkpoint unreadable ({e})") \
                from None
        for n, p in self.sae.named_parameters():
            self.opt.state[p] = {
                "step": opt_t[f"{n}.step"].reshape(()),
                "exp_avg": opt_t[f"{n}.exp_avg"].to(self.device),
                "exp_avg_sq": opt_t[f"{n}.exp_avg_sq"].to(self.device),
            }
        self.tokens_since_fired = st["tokens_since_fired"].clone()
        self.rng.set_state(st["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.sequences = state["sequences"]

    # ---- held-out summary ----------------------------------------------------------------
    @torch.no_grad()
    def heldout_summary(self, max_tokens: int, progress: bool = True) -> dict | None:
        seqs = self.source.eval_sequences(max_tokens)
        if len(seqs) == 0:
            return None
        stats = ReconstructionStats(len(self.layers), self.lm.d_model, self.n_latents)
        selection_dtype, self.sae.matmul_dtype = self.sae.matmul_dtype, None  # exact eval
        for ids in tqdm(list(batches(iter(seqs), self.cfg.train.batch_size)), desc="held-out",
                        disable=not progress, dynamic_ncols=True):
            x, _ = batch_activations(self.lm, ids, self.layers, self.cfg.data, self.device)
            if x.shape[1] == 0:
                continue
            out = self.sae(x.reshape(-1, x.shape[-1]))
            shape = (len(self.layers), x.shape[1], -1)
            stats.update(x, out.x_hat.reshape(shape), out.code.acts.reshape(shape),
                         out.code.idx.reshape(shape))
        self.sae.matmul_dtype = selection_dtype
        if stats.n == 0:
            return None
        return dict(stats.result(), layers=self.layers)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_run_config(run_dir: Path) -> RunConfig:
    state_path = run_dir / "checkpoint" / "state.json"
    if not state_path.is_file():
        raise UserError(f"--resume {str(run_dir)!r}: not a run folder (no checkpoint/state.json)")
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
            if name in RESUME_FREE:
                setattr(section, name, value)
            elif old != value:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"--resume: {flag} {value!r} disagrees with the run's {old!r}")
    return stored


def train(cfg: RunConfig | None = None, resume: str | os.PathLike | None = None,
          given: dict | None = None, lm: LanguageModel | None = None,
          on_step: Callable[[Trainer], None] | None = None, progress: bool = True) -> dict:
    """Train (or resume) a run; returns {"run_dir", "finished", "summary"}.

    `given` are explicitly set options (used to check a resumed run's config); `lm` lets a
    caller pass an already loaded model (tests, sweeps).
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = merge_resume(read_run_config(run_dir), dict(given or {}))
    else:
        cfg = cfg or RunConfig()
    validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if resume is None:
        run_dir = Path(cfg.train.out) if cfg.train.out else default_run_dir(cfg)
        if (run_dir / "checkpoint").exists():
            raise UserError(f"{str(run_dir)!r} already holds a run: use --resume {run_dir} "
                            "or another --out")
    if lm is None:
        n_layers, d_model = peek_shape(cfg.train.model)  # fail on bad flags before loading
        C.resolve_layers(cfg.train.layers, n_layers)
        if cfg.sae.k > cfg.sae.expansion_factor * d_model:
            raise UserError(f"--k {cfg.sae.k} exceeds n_latents "
                            f"{cfg.sae.expansion_factor * d_model}")
        lm = load_lm(cfg.train.model, cfg.train.device, cfg.train.dtype)
    trainer = Trainer(cfg, lm, run_dir)
    if resume is not None:
        trainer.load(run_dir / "checkpoint")
    finished = trainer.fit(on_step=on_step, progress=progress)
    summary = None
    if finished and cfg.train.eval_tokens > 0:
        summary = trainer.heldout_summary(int(cfg.train.eval_tokens), progress=progress)
        if summary is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"run_dir": run_dir, "finished": finished, "summary": summary, "trainer": trainer}
