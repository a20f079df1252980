import json
import os
import signal

import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.errors import TrainingDiverged, UserError
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train


def small_cfg(text_file, out, **train_kw):
    t = dict(model="tiny", layers="all", tokens=4 * 32 * 12, batch_size=4, log_every=2,
             save_every=5, eval_tokens=512, dead_tokens=300)
    t.update(train_kw)
    return RunConfig(SAEConfig(expansion_factor=4, k=8),
                     DataConfig(dataset=str(text_file), ctx_len=32),
                     TrainConfig(out=str(out), **t))


def test_train_writes_checkpoint_metrics_and_summary(tiny_lm, text_file, tmp_path):
    res = train(small_cfg(text_file, tmp_path / "run"), lm=tiny_lm, progress=False)
    run = tmp_path / "run"
    assert res["finished"]
    sae = MLSAE.from_pretrained(run)
    assert (sae.d_model, sae.n_latents, sae.k) == (32, 128, 8)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["layers"] == [0, 1, 2, 3] and cfg["hook_point"] == "resid_post"
    assert cfg["exclude_first"] == 1 and cfg["standardize"] is True
    assert cfg["run"]["train"]["tokens"] == 4 * 32 * 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert len(rows[0]["fvu"]) == 4 and len(rows[0]["l0"]) == 4
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary == res["summary"]
    assert len(summary["per_layer"]["fvu"]) == 4 and 0 < summary["mean"]["fvu"] < 1.5
    assert summary["mean"]["l0"] <= 8


def test_summary_fvu_matches_independent_computation(tiny_lm, text_file, tmp_path):
    res = train(small_cfg(text_file, tmp_path / "run"), lm=tiny_lm, progress=False)
    tr = res["trainer"]
    from mlsae.data import TokenSource, include_mask
    seqs = TokenSource(tr.cfg.data, tiny_lm.tokenizer, tiny_lm.eos_id).eval_sequences(512)
    mask = include_mask(seqs, tiny_lm.special_ids, tr.cfg.data)
    with torch.no_grad():
        hs = tiny_lm.model(seqs, output_hidden_states=True).hidden_states
    sae = MLSAE.from_pretrained(tmp_path / "run")
    for i, layer in enumerate([0, 1, 2]):  # last slot of hidden_states is normed: skip it
        x = hs[layer + 1][mask].double().numpy()
        x_hat = sae(torch.from_numpy(x).float()).x_hat.detach().double().numpy()
        fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert abs(fvu - res["summary"]["per_layer"]["fvu"][i]) < 1e-4


def _tensors(folder):
    out = load_file(str(folder / "model.safetensors"))
    out.update({f"opt.{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()})
    out.update(load_file(str(folder / "state.safetensors")))
    return out


def test_interrupt_and_resume_is_bit_identical(tiny_lm, text_file, tmp_path):
    full = train(small_cfg(text_file, tmp_path / "full"), lm=tiny_lm, progress=False)
    assert full["finished"]

    def sigint_at_7(trainer):
        if trainer.step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps

    part = train(small_cfg(text_file, tmp_path / "part"), lm=tiny_lm, on_step=sigint_at_7,
                 progress=False)
    assert not part["finished"]
    state = json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7 and not state["finished"]
    assert not (tmp_path / "part" / "summary.json").exists()

    resumed = train(resume=tmp_path / "part", lm=tiny_lm, progress=False)
    assert resumed["finished"]
    a = _tensors(tmp_path / "full" / "checkpoint")
    b = _tensors(tmp_path / "part" / "checkpoint")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # metrics log continues where it stopped: no step repeated or missing
    steps = [json.loads(r)["step"] for r in (tmp_path / "part" / "metrics.jsonl").open()]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_resume_rejects_disagreeing_flags(tiny_lm, text_file, tmp_path):
    train(small_cfg(text_file, tmp_path / "run", tokens=4 * 32 * 2), lm=tiny_lm,
          progress=False)
    with pytest.raises(UserError, match="k 16 disagrees with the run's 8"):
        train(resume=tmp_path / "run", given={"k": 16}, lm=tiny_lm, progress=False)
    with pytest.raises(UserError, match="not a run folder"):
        train(resume=tmp_path, lm=tiny_lm, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(small_cfg(text_file, tmp_path / "run"), lm=tiny_lm, progress=False)


def test_non_finite_stops_and_keeps_last_good_checkpoint(text_file, tmp_path):
    lm = make_tiny_lm("llama", n_layers=2)

    def poison_at_6(trainer):
        if trainer.step == 6:
            with torch.no_grad():
                lm.blocks[0].mlp.down_proj.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="non-finite activations at step 6"):
        train(small_cfg(text_file, tmp_path / "run"), lm=lm, on_step=poison_at_6,
              progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    sae = MLSAE.from_pretrained(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_single_layer_baseline_uses_same_code(tiny_lm, text_file, tmp_path):
    res = train(small_cfg(text_file, tmp_path / "run", layers="2"), lm=tiny_lm,
                progress=False)
    assert res["summary"]["layers"] == [2]
    assert MLSAE.from_pretrained(tmp_path / "run").config["layers"] == [2]


def test_runs_trained_apart_equal_runs_trained_alone(tiny_lm, text_file, tmp_path):
    """`train_apart` (the baselines' shared LM forward) gives every single-layer run exactly
    what training it alone gives: same weights, same metrics, same held-out summary, with an
    outlier rule that drops different tokens at different layers."""
    from dataclasses import replace

    from mlsae.train import train_apart

    def cfg(layer, out):
        c = small_cfg(text_file, out, layers=str(layer), tokens=4 * 32 * 6, dead_tokens=100)
        c.data = replace(c.data, exclude_outliers=1.4)  # tiny random model: some per layer
        return c

    alone = {v: train(cfg(v, tmp_path / f"alone{v}"), lm=tiny_lm, progress=False)
             for v in (0, 2, 3)}
    seen = {v: r["trainer"].tokens_seen for v, r in alone.items()}
    assert len(set(seen.values())) > 1, seen  # the outlier rule differs by layer
    res = train_apart([(cfg(v, tmp_path / f"apart{v}"), tmp_path / f"apart{v}")
                       for v in (0, 2, 3)], tmp_path / "data_index.jsonl", lm=tiny_lm,
                      progress=False)
    assert res["finished"] and [tr.layers for tr in res["trainers"]] == [[0], [2], [3]]
    for v, tr in zip((0, 2, 3), res["trainers"]):
        assert tr.tokens_seen == seen[v]
        a = load_file(tmp_path / f"alone{v}" / "model.safetensors")
        b = load_file(tmp_path / f"apart{v}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for name in ("metrics.jsonl", "summary.json"):
            ra = (tmp_path / f"alone{v}" / name).read_text()
            rb = (tmp_path / f"apart{v}" / name).read_text()
            if name == "metrics.jsonl":  # wall-clock rate aside
                ra, rb = ([{k: x for k, x in json.loads(r).items() if k != "tokens_per_s"}
                           for r in t.splitlines()] for t in (ra, rb))
            assert ra == rb
    with pytest.raises(UserError, match="agree on everything but their layers"):
        other = cfg(1, tmp_path / "x")
        other.sae.k = 4
        train_apart([(cfg(0, tmp_path / "y"), tmp_path / "y"), (other, tmp_path / "x")],
                    tmp_path / "i.jsonl", lm=tiny_lm, progress=False)


def test_runs_trained_apart_check_activations_after_their_own_outlier_rule(
        tiny_lm, text_file, tmp_path, monkeypatch):
    """An infinite activation at layer 3 is an outlier there: the run on layer 3 drops it and
    the run on layer 0 never sees it, alone or apart; neither stops as diverged."""
    from dataclasses import replace

    from mlsae.train import train_apart

    real = tiny_lm.resid_post

    def with_inf(ids, layers):
        out = real(ids, layers).clone()
        if 3 in layers:
            out[layers.index(3), 0, 5] = float("inf")
        return out

    monkeypatch.setattr(tiny_lm, "resid_post", with_inf)

    def cfg(layer, out):
        c = small_cfg(text_file, out, layers=str(layer), tokens=4 * 32 * 3, eval_tokens=0)
        c.data = replace(c.data, exclude_outliers=20.0)
        return c

    alone = train(cfg(3, tmp_path / "alone3"), lm=tiny_lm, progress=False)
    assert alone["finished"]
    res = train_apart([(cfg(v, tmp_path / f"a{v}"), tmp_path / f"a{v}") for v in (0, 3)],
                      tmp_path / "i.jsonl", lm=tiny_lm, progress=False)
    assert res["finished"]
    a = load_file(tmp_path / "alone3" / "model.safetensors")
    b = load_file(tmp_path / "a3" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingDiverged, match="non-finite activations"):
        c = cfg(3, tmp_path / "off")
        c.data = replace(c.data, exclude_outliers=0.0)
        train(c, lm=tiny_lm, progress=False)


def test_dead_latents_are_revived_by_auxk(tiny_lm, text_file, tmp_path):
    """With AuxK the dead fraction falls; the counters reset when a latent fires."""
    res = train(small_cfg(text_file, tmp_path / "run", dead_tokens=100, tokens=4 * 32 * 20),
                lm=tiny_lm, progress=False)
    tr = res["trainer"]
    assert tr.dead_tokens == 100
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(r["auxk_loss"] for r in rows) > 0
    assert tr.tokens_since_fired.min() == 0
