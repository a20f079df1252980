"""`mlsae eval / baselines / compare` on tiny models, against independent computations."""

import csv
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import save_tiny_model

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.baselines import baseline_config, baselines
from mlsae.cli import main
from mlsae.compare import compare
from mlsae.data import include_mask
from mlsae.evaluate import evaluate, kl_div
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train

TOKENS = 512  # 16 held-out sequences of 32


def run_cfg(model_dir, text_file, out, layers="0,1", tokens=4 * 32 * 4):
    return RunConfig(SAEConfig(expansion_factor=2, k=4),
                     DataConfig(dataset=str(text_file), ctx_len=32),
                     TrainConfig(model=str(model_dir), layers=layers, tokens=tokens,
                                 batch_size=4, eval_tokens=0, dead_tokens=100, out=str(out)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tiny_lm, tiny_model_dir, text_file, tmp_path_factory):
    """A tiny MLSAE on layers 0,1 of the 4-layer tiny Llama (saved as tiny_model_dir)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train(run_cfg(tiny_model_dir, text_file, out), lm=tiny_lm, progress=False)
    return out


def opts(**kw):
    return TextOptions(**dict(dict(tokens=TOKENS, batch_size=4), **kw))


def test_fvu_mse_l0_match_numpy(run, tiny_lm, tmp_path):
    res = evaluate(run, opts(), out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    sae = MLSAE.from_pretrained(run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts())
    ids = torch.cat(batch_list)
    mask = include_mask(ids, tiny_lm.special_ids, data_cfg)
    with torch.no_grad():
        hs = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    assert res["layers"] == [0, 1] and res["included_tokens"] == int(mask.sum())
    for i, layer in enumerate(res["layers"]):
        x = hs[layer + 1][mask].double().numpy()  # independent capture: block l's output
        with torch.no_grad():
            out = sae(torch.from_numpy(x).float())
        x_hat = out.x_hat.double().numpy()
        fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        mse = ((x_hat - x) ** 2).mean()
        l0 = (out.code.acts > 0).sum(-1).double().mean().item()
        assert res["per_layer"]["fvu"][i] == pytest.approx(fvu, rel=1e-5)
        assert res["per_layer"]["mse"][i] == pytest.approx(mse, rel=1e-5)
        assert res["per_layer"]["l0"][i] == pytest.approx(l0, rel=1e-9)
    assert res["mean"]["fvu"] == pytest.approx(np.mean(res["per_layer"]["fvu"]))


def test_ce_matches_direct_computation(run, tiny_lm, tmp_path):
    """CE_clean = mean -log p(next token) at included positions t < ctx_len - 1."""
    res = evaluate(run, opts(), out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    sae = MLSAE.from_pretrained(run)
    data_cfg, batch_list, _ = eval_batches(sae, tiny_lm, opts())
    ids = torch.cat(batch_list)
    pos = include_mask(ids, tiny_lm.special_ids, data_cfg)[:, :-1]
    with torch.no_grad():
        logp = tiny_lm.model(ids).logits[:, :-1].double().log_softmax(-1)
    ce = -logp.gather(2, ids[:, 1:, None]).squeeze(2)[pos].mean().item()
    assert res["ce_positions"] == int(pos.sum())
    assert res["per_layer"]["ce_clean"] == pytest.approx([ce, ce], rel=1e-5)


def _patch_x_hat(monkeypatch, make):
    """Keep the SAE's codes (for L0) but make its reconstruction `make(x)`."""
    real = MLSAE.forward

    def forward(self, x, dead=None, auxk=0):
        return real(self, x, dead, auxk)._replace(x_hat=make(x))

    monkeypatch.setattr(MLSAE, "forward", forward)


def test_identity_splice_is_exact(run, tiny_lm, tmp_path, monkeypatch):
    _patch_x_hat(monkeypatch, lambda x: x.clone())
    res = evaluate(run, opts(), out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    pl = res["per_layer"]
    assert pl["fvu"] == [0.0, 0.0]
    assert pl["dce"] == [0.0, 0.0] and pl["kl"] == [0.0, 0.0]
    assert pl["ce_recovered"] == [1.0, 1.0] and pl["ce_recon"] == pl["ce_clean"]
    assert all(z > c for z, c in zip(pl["ce_zero"], pl["ce_clean"]))


def test_zero_splice_recovers_nothing(run, tiny_lm, tmp_path, monkeypatch):
    _patch_x_hat(monkeypatch, torch.zeros_like)
    res = evaluate(run, opts(), out=tmp_path / "e.json", lm=tiny_lm, progress=False)
    pl = res["per_layer"]
    assert pl["ce_recovered"] == [0.0, 0.0] and pl["ce_recon"] == pl["ce_zero"]
    assert all(k > 0 for k in pl["kl"])


def test_mean_ablation(run, tiny_lm, tmp_path):
    zero = evaluate(run, opts(), out=tmp_path / "z.json", lm=tiny_lm, progress=False)
    mean = evaluate(run, opts(), out=tmp_path / "m.json", ablation="mean", lm=tiny_lm,
                    progress=False)
    assert mean["ablation"] == "mean"
    assert mean["per_layer"]["ce_recon"] == zero["per_layer"]["ce_recon"]
    assert mean["per_layer"]["ce_zero"] != zero["per_layer"]["ce_zero"]


def test_kl_by_hand():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    logits = torch.log(torch.tensor([p, q, p]))
    logp = logits.log_softmax(-1)
    logq = torch.log(torch.tensor([q, p, p])).log_softmax(-1)
    want = [sum(a * math.log(a / b) for a, b in zip(p, q)),
            sum(b * math.log(b / a) for a, b in zip(p, q)), 0.0]
    got = kl_div(logp, logq).tolist()
    assert got == pytest.approx(want, abs=1e-7)
    assert want[0] == pytest.approx(0.25 * math.log(2))


def test_cli_eval_writes_json_and_table(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run, ckpt, ignore=shutil.ignore_patterns("checkpoint", "*.jsonl"))
    assert main(["eval", str(ckpt), "--tokens", str(TOKENS), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    res = json.loads((ckpt / "eval.json").read_text())
    assert {"checkpoint", "model", "tokens", "layers", "per_layer", "mean", "dead_fraction",
            "ablation"} <= set(res)
    assert {"fvu", "mse", "l0", "dce", "kl", "ce_recovered", "ce_clean", "ce_recon",
            "ce_zero", "alive"} <= set(res["per_layer"])
    assert {"fvu", "l0", "dce", "kl", "ce_recovered"} <= set(res["mean"])
    assert all(len(v) == 2 for v in res["per_layer"].values())
    assert res["tokens"] == TOKENS and "note" not in res and res["ablation"] == "zero"
    table = {r.split()[0]: r.split() for r in out.splitlines() if r.split()}
    assert float(table["1"][1]) == pytest.approx(res["per_layer"]["fvu"][1], abs=1e-4)
    assert "mean" in table


def test_cli_eval_more_tokens_than_text(run, tmp_path, capsys):
    assert main(["eval", str(run), "--tokens", "1e7", "--out", str(tmp_path / "e.json"),
                 "--layers", "1"]) == 0
    err = capsys.readouterr().err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["layers"] == [1] and res["tokens"] < 10**7
    assert "asked for 10000000 tokens" in res["note"] and res["note"] in err


def test_baselines_matrix_resume_and_skip(run, tiny_lm, tmp_path):
    cfg = RunConfig.from_dict(json.loads((run / "checkpoint" / "state.json").read_text())
                              ["config"])
    # an interrupted baseline for layer 0: `baselines` must resume it, not restart it
    def ctrl_c_at_2(trainer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled between steps: checkpoint, stop

    part = train(baseline_config(cfg, 0, run / "baselines" / "layer_0"), lm=tiny_lm,
                 on_step=ctrl_c_at_2, progress=False)
    assert not part["finished"]
    res = baselines(run, opts=opts(tokens=256), lm=tiny_lm, progress=False)
    assert res["status"] == {0: "trained", 1: "trained"}
    state = json.loads((run / "baselines" / "layer_0" / "checkpoint" / "state.json").read_text())
    assert state["finished"] and state["step"] == state["total_steps"]
    rows = list(csv.reader((run / "baselines" / "fvu_matrix.csv").open()))
    assert rows[0] == ["train_layer", "0", "1"] and [r[0] for r in rows[1:]] == ["0", "1"]
    assert (run / "baselines" / "fvu_matrix.png").stat().st_size > 1000
    # the diagonal is each baseline's own FVU on the same text
    for layer in (0, 1):
        own = evaluate(run / "baselines" / f"layer_{layer}", opts(tokens=256),
                       out=tmp_path / "e.json", lm=tiny_lm, progress=False)
        assert float(rows[1 + layer][1 + layer]) == pytest.approx(own["per_layer"]["fvu"][0],
                                                                  rel=1e-4)
    before = (run / "baselines" / "layer_1" / "model.safetensors").stat().st_mtime_ns
    again = baselines(run, layers="1", opts=opts(tokens=256), lm=tiny_lm, progress=False)
    assert again["status"] == {1: "skipped"} and again["train_layers"] == [0, 1]
    assert (run / "baselines" / "layer_1" / "model.safetensors").stat().st_mtime_ns == before


def test_interrupted_shared_baselines_resume_together(run, tiny_lm, tmp_path):
    """Baselines trained together and stopped by Ctrl-C resume together (one LM forward per
    batch, the shared data index) and end bit-identical to baselines trained alone."""
    from safetensors.torch import load_file

    from mlsae.train import train_apart

    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("baselines"))
    cfg = RunConfig.from_dict(json.loads((mine / "checkpoint" / "state.json").read_text())
                              ["config"])
    root = mine / "baselines"

    def ctrl_c_at_2(trainer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    plan = [(baseline_config(cfg, v, root / f"layer_{v}"), root / f"layer_{v}") for v in (0, 1)]
    part = train_apart(plan, root / "data_index.jsonl", lm=tiny_lm, progress=False,
                       on_step=ctrl_c_at_2)
    assert not part["finished"]
    calls = []
    real = train_apart

    def spy(plan, *a, **kw):
        calls.append(([str(f.name) for _, f in plan], kw.get("resume")))
        return real(plan, *a, **kw)

    import mlsae.baselines as B
    B.train_apart = spy
    try:
        res = baselines(mine, opts=opts(tokens=128), lm=tiny_lm, progress=False)
    finally:
        B.train_apart = real
    assert res["status"] == {0: "trained", 1: "trained"}
    assert calls == [(["layer_0", "layer_1"], True)]  # one shared resume, not one per layer
    for v in (0, 1):
        alone = train(baseline_config(cfg, v, tmp_path / f"alone{v}"), lm=tiny_lm,
                      progress=False)
        assert alone["finished"]
        a = load_file(tmp_path / f"alone{v}" / "model.safetensors")
        b = load_file(root / f"layer_{v}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_compare_writes_csv_and_png(run, tiny_lm, tmp_path):
    if not (run / "baselines" / "layer_1" / "config.json").is_file():
        baselines(run, opts=opts(tokens=256), lm=tiny_lm, progress=False)
    evaluate(run, opts(), lm=tiny_lm, progress=False)  # the MLSAE's eval.json: its text rules
    for layer in (0, 1):
        (run / "baselines" / f"layer_{layer}" / "eval.json").unlink(missing_ok=True)
    res = compare(run, run / "baselines", out_dir=tmp_path, lm=tiny_lm, progress=False)
    assert "note" not in res  # missing evaluations used the MLSAE's recorded options
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [r["layer"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["layer", "mlsae_fvu", "baseline_fvu", "mlsae_dce",
                             "baseline_dce", "mlsae_l0", "baseline_l0"]
    mlsae = json.loads((run / "eval.json").read_text())
    b1 = json.loads((run / "baselines" / "layer_1" / "eval.json").read_text())
    assert float(rows[1]["mlsae_fvu"]) == pytest.approx(mlsae["per_layer"]["fvu"][1])
    assert float(rows[1]["baseline_dce"]) == pytest.approx(b1["per_layer"]["dce"][0])
    assert (tmp_path / "compare.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def narrow_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("narrow"), n_layers=2, d=16)


@pytest.fixture(scope="module")
def shallow_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("shallow"), n_layers=1, d=32)


def test_bad_input_is_one_line_exit_2(run, tmp_path, narrow_model_dir, shallow_model_dir,
                                      capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run / "config.json", broken / "config.json")
    cases = [
        (["eval", str(broken)], "missing model.safetensors"),
        (["eval", str(tmp_path / "nope")], "no such folder"),
        (["eval", str(run), "--model", str(narrow_model_dir)], "has d_model 16, the "
         "checkpoint 32"),
        (["eval", str(run), "--model", str(shallow_model_dir)], "checkpoint layer 1 does "
         "not exist"),
        (["eval", str(run), "--layers", "2"], "layer 2 is not in the checkpoint (its "
         "layers: 0,1)"),
        (["eval", str(run), "--layers", "x"], "--layers 'x' is malformed"),
        (["eval", str(run), "--replace", "0,5"], "--replace: layer 5 is not in the checkpoint"),
        (["eval", str(run), "--batch-size", "0"], "--batch-size must be positive"),
        (["baselines", str(run), "--layers", "3"], "layer 3 is not in the checkpoint"),
        (["baselines", str(broken)], "missing model.safetensors"),
        (["baselines", str(tmp_path)], "is not a run folder"),
        (["compare", str(run), str(tmp_path)], "holds no single-layer SAE checkpoint"),
        (["compare", str(broken), str(tmp_path)], "missing model.safetensors"),
    ]
    for argv, msg in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--ablation", "one"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ---- chunked head (issue 11.6) and multi-layer replacement (issue 14.2) ----------------------
def _lm_with_vocab(arch, vocab, softcap=None, n_layers=3):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from mlsae.lm import wrap_model

    cfg = tiny_config(arch, n_layers=n_layers)
    cfg.vocab_size = vocab
    if softcap is not None:
        cfg.final_logit_softcapping = softcap
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    from conftest import byte_tokenizer
    return wrap_model(model, byte_tokenizer(), f"tiny-{arch}-{vocab}")


def _batches(vocab, n=2, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, min(vocab, 256), (batch, seq), generator=g)
        ids[0, 5] = 257  # an EOS inside the text: excluded, but a CE target of position 4
        out.append(ids)
    return out


def _full_logits_stats(sae, lm, layers, batches, data_cfg, ablation):
    """The computation before issue 11.6: full [batch, seq, vocab] logits per splice."""
    n, clean_sum = 0, 0.0
    recon_sum, zero_sum, kl_sum = [0.0] * len(layers), [0.0] * len(layers), [0.0] * len(layers)
    with torch.no_grad():
        for ids in batches:
            mask = include_mask(ids, lm.special_ids, data_cfg)
            pos, targets = mask[:, :-1], ids[:, 1:][mask[:, :-1]]
            resid = lm.resid_post(ids, layers)
            logp = lm.logits_from(ids, layers[-1], resid[-1])[:, :-1][pos].log_softmax(-1)
            n += int(pos.sum())
            clean_sum += -logp.gather(1, targets[:, None]).sum().item()
            for i, layer in enumerate(layers):
                spliced = resid[i].clone()
                spliced[mask] = sae(resid[i][mask]).x_hat
                logq = lm.logits_from(ids, layer, spliced)[:, :-1][pos].log_softmax(-1)
                recon_sum[i] += -logq.gather(1, targets[:, None]).sum().item()
                kl_sum[i] += (logp.exp() * (logp - logq)).sum().item()
                spliced[mask] = ablation[i]
                logz = lm.logits_from(ids, layer, spliced)[:, :-1][pos].log_softmax(-1)
                zero_sum[i] += -logz.gather(1, targets[:, None]).sum().item()
    return {"ce_clean": clean_sum / n, "ce_recon": [v / n for v in recon_sum],
            "ce_zero": [v / n for v in zero_sum], "kl": [v / n for v in kl_sum], "n": n}


@pytest.mark.parametrize("arch,vocab,softcap", [("llama", 259, None),
                                                ("gemma3", 50_000, 30.0)])
def test_chunked_ce_kl_equal_full_logits(arch, vocab, softcap, monkeypatch):
    """CE and KL from the last block's resid_post, unembedded a few positions at a time (and
    a few layers per group), equal the full-logits computation to float tolerance."""
    import mlsae.evaluate as ev

    lm = _lm_with_vocab(arch, vocab, softcap)
    if softcap is not None:  # the soft-capping is active: logits beyond the cap are squashed
        assert lm.model.config.final_logit_softcapping == softcap
    layers, data_cfg = [0, 1, 2], DataConfig(ctx_len=24)
    batches = _batches(vocab)
    torch.manual_seed(2)
    sae = MLSAE(32, 64, 4)
    ablation = torch.randn(3, 32)
    want = _full_logits_stats(sae, lm, layers, batches, data_cfg, ablation)
    # 5 rows per chunk and one layer per group: several chunks and groups per batch
    monkeypatch.setattr(ev, "CHUNK_BYTES", 5 * 4 * vocab)
    monkeypatch.setattr(ev, "CHUNK_MIN_ROWS", 1)
    monkeypatch.setattr(ev, "HIDDEN_BYTES", 2 * 60 * 32 * 4)
    rec, ce, rep = ev.evaluate_batches(sae, lm, layers, batches, data_cfg, ablation,
                                       progress=False)
    got = ce.result()
    assert rep is None and ce.n == want["n"]
    assert got["ce_clean"][0] == pytest.approx(want["ce_clean"], rel=1e-5)
    for key in ("ce_recon", "ce_zero"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert min(want["kl"]) > 0


def test_head_that_does_not_split_falls_back_to_full_logits(tiny_lm, monkeypatch):
    """A model whose unembed does not reproduce its logits is evaluated from full logits."""
    import mlsae.evaluate as ev

    layers, data_cfg, batches = [1, 3], DataConfig(ctx_len=24), _batches(259, n=1)
    torch.manual_seed(3)
    sae, ablation = MLSAE(32, 64, 4), torch.zeros(2, 32)
    want = _full_logits_stats(sae, tiny_lm, layers, batches, data_cfg, ablation)
    monkeypatch.setattr(type(tiny_lm), "unembed", lambda self, h: h[..., :259] * 0)
    head = ev._Head(tiny_lm, batches[0])
    assert not head.split
    _, ce, _ = ev.evaluate_batches(sae, tiny_lm, layers, batches, data_cfg, ablation,
                                   progress=False)
    assert ce.result()["ce_recon"] == pytest.approx(want["ce_recon"], rel=1e-5)


def test_curve_counts():
    from mlsae.evaluate import curve_counts

    assert curve_counts(30) == [1, 4, 7, 11, 14, 17, 20, 24, 27, 30]
    assert curve_counts(5) == [1, 2, 3, 4, 5] and curve_counts(12, 0) == list(range(1, 13))
    assert curve_counts(7, 1) == [7] and curve_counts(1) == [1]


def _brute_force_replacement(recon, lm, layers, counts, batches, data_cfg):
    """Hooks on the blocks replace each chosen block's output at the included positions by its
    reconstruction, in one plain forward per curve point; float64 log-softmax."""
    out = {}
    for n in counts:
        ce_sum, kl_sum, clean_sum, n_pos = 0.0, 0.0, 0.0, 0
        for ids in batches:
            mask = include_mask(ids, lm.special_ids, data_cfg)

            def hook(module, args, output, layer=None, mask=mask):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[mask] = recon(layer, h[mask])
                return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

            with torch.no_grad():
                clean = lm.model(ids).logits.double().log_softmax(-1)
                handles = [lm.blocks[v].register_forward_hook(
                    lambda m, a, o, v=v: hook(m, a, o, layer=v)) for v in layers[:n]]
                try:
                    repl = lm.model(ids).logits.double().log_softmax(-1)
                finally:
                    for h in handles:
                        h.remove()
            pos, targets = mask[:, :-1], ids[:, 1:][mask[:, :-1]]
            p, q = clean[:, :-1][pos], repl[:, :-1][pos]
            clean_sum += -p.gather(1, targets[:, None]).sum().item()
            ce_sum += -q.gather(1, targets[:, None]).sum().item()
            kl_sum += (p.exp() * (p - q)).sum().item()
            n_pos += int(pos.sum())
        out[n] = {"ce": ce_sum / n_pos, "kl": kl_sum / n_pos, "ce_clean": clean_sum / n_pos}
    return out


def test_replacement_matches_brute_force_hooks(tiny_lm):
    import mlsae.evaluate as ev

    data_cfg, batches = DataConfig(ctx_len=24), _batches(259)
    torch.manual_seed(4)
    sae = MLSAE(32, 64, 4)
    replace, counts = [0, 2, 3], [1, 2, 3]
    _, ce, rep = ev.evaluate_batches(sae, tiny_lm, [0, 1], batches, data_cfg,
                                     torch.zeros(2, 32), progress=False, replace=replace,
                                     curve=counts)
    res = rep.result()
    want = _brute_force_replacement(lambda _l, x: sae(x).x_hat, tiny_lm, replace, counts,
                                    batches, data_cfg)
    assert res["layers"] == replace and [p["n_layers"] for p in res["curve"]] == counts
    assert [p["layers"] for p in res["curve"]] == [[0], [0, 2], [0, 2, 3]]
    assert res["ce_clean"] == pytest.approx(want[3]["ce_clean"], rel=1e-5)
    for pt in res["curve"]:
        assert pt["ce"] == pytest.approx(want[pt["n_layers"]]["ce"], rel=1e-5)
        assert pt["kl"] == pytest.approx(want[pt["n_layers"]]["kl"], rel=1e-4)
    assert res["ce_replaced"] == res["curve"][-1]["ce"] and res["kl"] == res["curve"][-1]["kl"]
    assert res["dce"] == pytest.approx(res["ce_replaced"] - res["ce_clean"])
    # one layer replaced is the single-layer splice of that layer
    assert res["curve"][0]["ce"] == pytest.approx(ce.result()["ce_recon"][0], rel=1e-6)
    # free-running differs from replacing each layer in the CLEAN stream (errors compound)
    assert res["curve"][-1]["kl"] > res["curve"][0]["kl"]


def test_replacement_with_per_layer_saes_and_identity(tiny_lm):
    """Each layer by its own SAE (the baselines' curve) against the brute force; an identity
    reconstruction changes nothing."""
    import mlsae.evaluate as ev

    data_cfg, batches = DataConfig(ctx_len=24), _batches(259, n=1)
    torch.manual_seed(5)
    saes = {1: MLSAE(32, 64, 4), 3: MLSAE(32, 64, 8)}
    _, _, rep = ev.evaluate_batches(saes[1], tiny_lm, [], batches, data_cfg, torch.zeros(0, 32),
                                    progress=False, replace=[1, 3], recon=ev.saes_recon(saes))
    want = _brute_force_replacement(lambda v, x: saes[v](x).x_hat, tiny_lm, [1, 3], [1, 2],
                                    batches, data_cfg)
    for pt in rep.result()["curve"]:
        assert pt["ce"] == pytest.approx(want[pt["n_layers"]]["ce"], rel=1e-5)
    _, _, same = ev.evaluate_batches(saes[1], tiny_lm, [], batches, data_cfg, torch.zeros(0, 32),
                                     progress=False, replace=[0, 1, 2, 3],
                                     recon=lambda _l, x: x)
    r = same.result()
    assert r["dce"] == 0.0 and r["kl"] == 0.0 and r["curve"][0]["ce"] == r["ce_clean"]


def test_cli_eval_replace(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--tokens", "256", "--batch-size", "4", "--out", str(out),
                 "--replace", "all"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rep = res["replacement"]
    assert set(rep) == {"layers", "ce_clean", "ce_replaced", "dce", "kl", "curve"}
    assert rep["layers"] == [0, 1] and [p["n_layers"] for p in rep["curve"]] == [1, 2]
    assert set(rep["curve"][0]) == {"n_layers", "layers", "ce", "kl"}
    assert rep["ce_clean"] == pytest.approx(res["per_layer"]["ce_clean"][0])
    assert rep["curve"][0]["ce"] == pytest.approx(res["per_layer"]["ce_recon"][0], rel=1e-6)
    assert "replacement of layers 0,1 at once" in printed


def test_compare_replacement_curves(run, tiny_lm, tmp_path, capsys):
    """compare overlays the baselines' curve (each layer by its own SAE, free-running) on the
    MLSAE's, on the MLSAE's eval text; checked against the brute-force hooks."""
    if not (run / "baselines" / "layer_1" / "config.json").is_file():
        baselines(run, opts=opts(tokens=256), lm=tiny_lm, progress=False)
    own = evaluate(run, opts(tokens=256), lm=tiny_lm, progress=False, replace="all")
    res = compare(run, run / "baselines", out_dir=tmp_path, lm=tiny_lm, progress=False)
    data = json.loads((tmp_path / "compare_replacement.json").read_text())
    assert data["layers"] == [0, 1] and data["mlsae"] == own["replacement"]
    assert res["replacement"]["data"] == data
    base = {v: MLSAE.from_pretrained(run / "baselines" / f"layer_{v}") for v in (0, 1)}
    data_cfg, batch_list, _ = eval_batches(MLSAE.from_pretrained(run), tiny_lm,
                                           opts(tokens=256))
    want = _brute_force_replacement(lambda v, x: base[v](x).x_hat, tiny_lm, [0, 1], [1, 2],
                                    batch_list, data_cfg)
    for pt in data["baseline"]["curve"]:
        assert pt["ce"] == pytest.approx(want[pt["n_layers"]]["ce"], rel=1e-5)
        assert pt["kl"] == pytest.approx(want[pt["n_layers"]]["kl"], rel=1e-4)
    rows = list(csv.DictReader((tmp_path / "replacement.csv").open()))
    assert [r["n_layers"] for r in rows] == ["1", "2"]
    assert float(rows[1]["baseline_ce"]) == pytest.approx(data["baseline"]["ce_replaced"])
    assert (tmp_path / "replacement.png").stat().st_size > 1000
    # another layer set than eval.json's: the MLSAE's curve is computed on it too
    assert main(["compare", str(run), str(run / "baselines"), "--out-dir",
                 str(tmp_path / "one"), "--replace", "1"]) == 0
    assert "multi-layer replacement of layers 1" in capsys.readouterr().out
    one = json.loads((tmp_path / "one" / "compare_replacement.json").read_text())
    assert one["layers"] == [1]
    assert one["mlsae"]["ce_replaced"] == pytest.approx(own["per_layer"]["ce_recon"][1],
                                                        rel=1e-6)


def test_report_shows_replacement_curves(run, tiny_lm, tmp_path):
    """The report's replacement section: the MLSAE's and the baselines' numbers and figure."""
    from mlsae.analysis.report import replacement_section

    own = evaluate(run, opts(tokens=256), lm=tiny_lm, progress=False, replace="all")
    if not (run / "baselines" / "layer_1" / "config.json").is_file():
        baselines(run, opts=opts(tokens=256), lm=tiny_lm, progress=False)
    if not (run / "compare_replacement.json").is_file():
        compare(run, run / "baselines", lm=tiny_lm, progress=False)
    cmp = json.loads((run / "compare_replacement.json").read_text())
    html = replacement_section(run, tmp_path)
    assert "single-layer SAEs" in html and "MLSAE" in html
    assert f"{own['replacement']['dce']:.4g}" in html
    assert f"{cmp['baseline']['dce']:.4g}" in html
    assert (tmp_path / "replacement.png").stat().st_size > 1000
