"""mlsae.train.loss, called directly: FVU per layer, AuxK with dead latents, the fired mask and
L0 against a dense float64 re-statement of SPEC §3; and its DDP reductions (two gloo ranks
holding halves of the batch) against one process holding all of it."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlsae.sae import MLSAE
from mlsae.train.distributed import Dist
from mlsae.train.loss import loss, update_dead_counters

L, T, D, N, K, AUXK = 3, 10, 8, 24, 3, 5

# Both top-k paths (C kernel, torch.topk) for the single-process tests: see conftest.
both_paths = pytest.mark.usefixtures("topk_path")


def make_sae(seed: int = 0, arch: str = "topk") -> MLSAE:
    g = torch.Generator().manual_seed(seed)
    sae = MLSAE(D, N, K, architecture=arch)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.3, generator=g)
    return sae


def make_x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, T, D, generator=g) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2


def dense_loss(sae: MLSAE, x: torch.Tensor, dead: torch.Tensor, coef: float):
    """SPEC §3 written out densely in float64 (every latent's pre-activation materialised)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().requires_grad_()
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xf = x.double().reshape(-1, D)
    mu = xf.mean(1, keepdim=True)
    std = ((xf - mu) ** 2).mean(1, keepdim=True).sqrt()
    xt = (xf - mu) / (std + sae.eps)
    pre = (xt - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(K, dim=1)
    a = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    xt_hat = a @ W_dec + b_dec
    x_hat = xt_hat * (std + sae.eps) + mu
    err = ((x_hat - xf) ** 2).sum(1).view(L, T).sum(1)
    xl = x.double()
    var = ((xl - xl.mean(1, keepdim=True)) ** 2).sum((1, 2))
    total = (err / var).mean()
    dead_ids = dead.nonzero().squeeze(1)
    aux_vals, aux_pos = pre[:, dead_ids].topk(min(AUXK, len(dead_ids)), dim=1)
    e = (xt - xt_hat).detach()  # the residual is a target (Gao et al.; sparsify detaches too)
    e_hat = torch.zeros(len(xf), N, dtype=torch.float64).scatter(
        1, dead_ids[aux_pos], aux_vals.relu()) @ W_dec
    aux = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum() * min(len(dead_ids) / AUXK, 1)
    total = total + coef * aux
    total.backward()
    fired = torch.zeros(N, dtype=torch.bool)
    fired[idx[vals > 1e-3]] = True
    l0 = (vals > 0).view(L, T, K).sum((1, 2)).double()
    return total, err, var, aux, fired, l0, [p.grad for p in (W_enc, b_enc, W_dec, b_dec)]


@both_paths
def test_loss_matches_dense_restatement_with_dead_latents():
    sae, x = make_sae(), make_x()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = loss(sae, x, dead, auxk=AUXK, auxk_coef=0.5)
    out.loss.backward()
    total, err, var, aux, fired, l0, grads = dense_loss(sae, x, dead, 0.5)
    assert out.n_tokens == T
    torch.testing.assert_close(out.err, err.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.var.double(), var, rtol=1e-5, atol=1e-6)
    assert out.fvu == pytest.approx((err / var).tolist(), rel=1e-5)
    assert out.aux_loss == pytest.approx(aux.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert torch.equal(out.fired, fired)
    torch.testing.assert_close(out.l0, l0)
    for p, g in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), grads):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-6)


@both_paths
def test_loss_without_dead_latents_has_no_auxk():
    sae, x = make_sae(), make_x()
    out = loss(sae, x, torch.zeros(N, dtype=torch.bool), auxk=AUXK)
    total, *_ = dense_loss(sae, x, torch.zeros(N, dtype=torch.bool), 0.0)
    assert out.aux_loss == 0.0
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)


def test_empty_batch_gives_none():
    assert loss(make_sae(), torch.zeros(L, 0, D), None) is None


def test_dead_counters_advance_and_reset():
    counters = torch.tensor([5, 0, 7, 100])
    update_dead_counters(counters, torch.tensor([False, True, False, True]), 10)
    assert counters.tolist() == [15, 0, 17, 0]


def _rank(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    sae, x = make_sae(), make_x()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    half = x[:, :4] if rank == 0 else x[:, 4:]  # unequal shares on purpose
    out = loss(sae, half, dead, Dist(rank, 2), auxk=AUXK, auxk_coef=0.5)
    out.loss.backward()
    grads = [p.grad.clone() for p in sae.parameters()]
    for g in grads:
        dist.all_reduce(g)
    # numpy arrays travel by value: a torch tensor in a Queue is passed as a file descriptor
    # that the parent can only fetch while this process lives (a reset under load)
    q.put((rank, out.err.numpy(), out.var.numpy(), out.aux_loss, out.fired.numpy(),
           out.l0.numpy(), out.n_tokens, [g.numpy() for g in grads]))
    dist.barrier()
    dist.destroy_process_group()


def two_ranks(target) -> list:
    """Run `target(rank, port, queue)` in two spawned gloo ranks; what each put on the queue."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return got


def test_ddp_reductions_make_two_ranks_equal_one_process():
    got = two_ranks(_rank)
    sae, x = make_sae(), make_x()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    ref = loss(sae, x, dead, auxk=AUXK, auxk_coef=0.5)
    ref.loss.backward()
    for _rank_id, err, var, aux, fired, l0, n_tok, grads in got:
        err, var, fired, l0 = (torch.from_numpy(a) for a in (err, var, fired, l0))
        grads = [torch.from_numpy(g) for g in grads]
        assert n_tok == T
        torch.testing.assert_close(err, ref.err)
        torch.testing.assert_close(var, ref.var)
        assert aux == pytest.approx(ref.aux_loss, rel=1e-6)
        assert torch.equal(fired, ref.fired)
        torch.testing.assert_close(l0, ref.l0)
        for g, p in zip(grads, sae.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def _rank_batchtopk(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    sae, x = make_sae(arch="batchtopk"), make_x()
    half = x[:, :4] if rank == 0 else x[:, 4:]
    out = loss(sae, half, torch.zeros(N, dtype=torch.bool), Dist(rank, 2))
    q.put((rank, out.err.numpy(), out.fired.numpy(), out.l0.numpy(), out.min_kept))
    dist.barrier()
    dist.destroy_process_group()


def test_batchtopk_in_two_ranks_budgets_per_rank_and_takes_the_minimum_threshold():
    """BatchTopK under DDP (documented): each rank keeps the top k x ITS OWN vectors, so two
    ranks equal each half evaluated alone, summed; the running threshold's statistic is the
    minimum over ranks."""
    got = two_ranks(_rank_batchtopk)
    sae, x = make_sae(arch="batchtopk"), make_x()
    none = torch.zeros(N, dtype=torch.bool)
    halves = [loss(sae, x[:, :4], none), loss(sae, x[:, 4:], none)]
    whole = loss(sae, x, none)
    # each half alone keeps exactly k x its vectors: L x 4 x K and L x 6 x K entries
    assert [float(h.l0.sum()) for h in halves] == [L * 4 * K, L * 6 * K]
    assert halves[0].min_kept != halves[1].min_kept  # so the minimum is a real choice
    for _r, err, fired, l0, low in got:
        torch.testing.assert_close(torch.from_numpy(err), halves[0].err + halves[1].err)
        assert torch.equal(torch.from_numpy(fired), halves[0].fired | halves[1].fired)
        torch.testing.assert_close(torch.from_numpy(l0), halves[0].l0 + halves[1].l0)
        assert low == min(halves[0].min_kept, halves[1].min_kept) < float("inf")
    # and it is not the one-process budget over the whole batch (a different selection)
    assert not torch.allclose(halves[0].err + halves[1].err, whole.err)
