"""The training loss (SPEC §3): FVU per layer averaged over layers, plus AuxK on dead latents,
with every denominator reduced over the ranks of a torchrun job; and the dead-latent counters.

`loss` is a pure function of (sae, x, dead, dist): it runs the SAE's training forward and
returns the scalar to differentiate and the statistics of the step. Each rank's scalar is its
share of the single-process loss on the global batch (the denominators are all-reduced), so
the SUM over ranks of the gradients is the single-process gradient. Uses the SAE, metrics and
the distributed glue.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributed import ReduceOp

from mlsae.metrics import centred_sum_sq, f64
from mlsae.sae import MLSAE, sparse_decode
from mlsae.train.distributed import Dist, all_reduce_

FIRED_THRESHOLD = 1e-3  # a latent "fires" above this activation (Gao et al.)


class LossOutput(NamedTuple):
    loss: Tensor  # scalar to backpropagate: this rank's share of the global loss
    err: Tensor  # [layer] float64 sum of squared errors over the global batch (see f64)
    var: Tensor  # [layer] float32 centred sum of squares of x over the global batch, x's device
    aux_loss: float  # AuxK loss over the global batch (0 when no latent is dead)
    fired: Tensor  # [n_latents] bool: fired somewhere in the global batch
    l0: Tensor  # [layer] float64 sum over tokens of active latents, global batch
    n_tokens: int  # tokens per layer in the global batch
    min_kept: float  # the global batch's minimum of the rule's `level` (inf: it has none)
    extra: float  # prefix FVUs and penalty terms of the loss beyond mean FVU (global)

    @property
    def fvu(self) -> list[float]:
        return (self.err / f64(self.var).to(self.err.device)).tolist()


def layer_variance(x: Tensor, dist: Dist) -> tuple[Tensor, int]:
    """Centred sum of squares per layer of `x [layer, token, d]` over the global batch ->
    (`[layer]` float32, clamped away from 0; tokens per layer in the global batch).

    Row norms and sums are float32 (pairwise-summed); the cancelling difference is taken in
    float64 (`f64`: on the host where the device has none)."""
    n_layers, n_tok, d = x.shape
    with torch.no_grad():
        totals = torch.cat([f64(x.sum(1)).flatten(),
                            f64(torch.linalg.vector_norm(x, dim=2)).square().sum(1),
                            f64(torch.tensor([float(n_tok)], device=x.device))])
        all_reduce_(totals, dist)
        sum_x = totals[: n_layers * d].view(n_layers, d)
        sum_sq = totals[n_layers * d: n_layers * d + n_layers]
        n_all = totals[-1]
        var = centred_sum_sq(sum_x, sum_sq, n_all).float().clamp_min(1e-12).to(x.device)
    return var, int(n_all)


def auxk_loss(sae: MLSAE, resid: Tensor, aux_acts: Tensor, aux_idx: Tensor, n_dead: int,
              auxk: int, dist: Dist) -> Tensor:
    """Gao et al.'s AuxK: the dead latents' top-auxk code reconstructs the residual error
    e = x~ - x~_hat (`resid` is x~_hat - x~, standardized space), normalised by e's centred
    sum of squares over the global batch and scaled by min(n_dead / auxk, 1)."""
    e = -resid  # [N, d]
    e_hat = sparse_decode(aux_acts, aux_idx, sae.W_dec)
    d = e.shape[1]
    with torch.no_grad():
        tot = all_reduce_(torch.cat([
            f64(e.sum(0)),
            f64(torch.linalg.vector_norm(e, dim=1)).square().sum()[None],
            f64(torch.tensor([float(len(e))], device=e.device))]), dist)
        e_var = centred_sum_sq(tot[:d], tot[d], tot[-1]).float().clamp_min(1e-12).to(e.device)
    return (e_hat - e).pow(2).sum() / e_var * min(n_dead / auxk, 1.0)


def loss(sae: MLSAE, x: Tensor, dead: Tensor | None, dist: Dist | None = None, auxk: int = 0,
         auxk_coef: float = 1 / 32, matmul_dtype: torch.dtype | None = None,
         penalty_coef: float = 0.0) -> LossOutput | None:
    """The loss of `sae` on this rank's `x [layer, token, d_model]`.

    `dead [n_latents]` bool marks the dead latents (None or all False: no AuxK). Returns None
    when the global batch holds no token. The loss is mean_l err_l / var_l + auxk_coef * AuxK,
    with err_l and var_l summed over the global batch; for Matryoshka the first term is the
    mean over the nested prefixes of the same FVU; for JumpReLU `penalty_coef` x the mean L0
    per vector is added.
    """
    dist = dist or Dist()
    n_layers, n_tok, d = x.shape
    var, n_all = layer_variance(x, dist)
    if n_all == 0:
        return None
    n_dead = int(dead.sum()) if dead is not None else 0
    out = sae.forward_train(x.reshape(-1, d), dead=dead.to(x.device) if n_dead else None,
                            auxk=auxk, matmul_dtype=matmul_dtype, n_layers=n_layers)
    err = out.err.view(n_layers, n_tok).sum(1)  # [layer], this rank
    total = (err / var).mean()
    extra = torch.zeros((), device=x.device)  # this rank's share beyond the full code's FVU
    if out.prefix_err:
        prefixes = [(e.view(n_layers, n_tok).sum(1) / var).mean() for e in out.prefix_err]
        mean = (total + sum(prefixes)) / (len(prefixes) + 1)
        total, extra = mean, mean - total
    if out.penalty is not None and penalty_coef:
        pen = penalty_coef * out.penalty.sum() / (n_all * n_layers)
        total, extra = total + pen, extra + pen
    aux = torch.zeros((), device=x.device)
    if out.aux_acts is not None:
        aux = auxk_loss(sae, out.resid, out.aux_acts, out.aux_idx, n_dead, auxk, dist)
        total = total + auxk_coef * aux
    with torch.no_grad():
        stats = all_reduce_(torch.cat([f64(err), f64(aux)[None], f64(extra.detach())[None]]),
                            dist)
        acts, idx = out.code.acts, out.code.idx
        low = torch.full((1,), torch.inf, device=x.device)
        if out.level is not None:  # the rules with a running threshold: their statistic
            low = out.level.reshape(1).float()
            all_reduce_(low, dist, op=ReduceOp.MIN)
        fired = torch.bincount(idx.flatten(), weights=(acts > FIRED_THRESHOLD).flatten().float(),
                               minlength=sae.n_latents).gt(0).int()
        l0 = f64((acts > 0).reshape(n_layers, n_tok, -1).sum(-1)).sum(1)  # [layer]
        all_reduce_(fired, dist, op=ReduceOp.MAX)
        all_reduce_(l0, dist)
    return LossOutput(total, stats[:n_layers], var, stats[n_layers].item(), fired.bool(), l0,
                      n_all, float(low), stats[-1].item())


def update_dead_counters(tokens_since_fired: Tensor, fired: Tensor, n_tokens: int) -> Tensor:
    """Advance `tokens_since_fired [n_latents]` by the step's tokens and reset the latents
    that fired (in place); returns it."""
    tokens_since_fired += n_tokens
    tokens_since_fired[fired.cpu()] = 0
    return tokens_since_fired
