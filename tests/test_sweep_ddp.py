"""Sweeps (several SAEs from one LM forward) and torchrun data-parallel training."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import small_cfg

from mlsae.errors import UserError
from mlsae.train import train
from mlsae.train.sweep import parse_sweep


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_parse_sweep():
    assert parse_sweep("k=16,32 expansion_factor=8") == [
        {"k": 16, "expansion_factor": 8}, {"k": 32, "expansion_factor": 8}]
    assert parse_sweep("lr=1e-3,2e-3 standardize=true") == [
        {"lr": 1e-3, "standardize": True}, {"lr": 2e-3, "standardize": True}]
    for bad, msg in [("model=x", "key one of"), ("k=", "key one of"), ("k=a", "bad value")]:
        with pytest.raises(UserError, match=msg):
            parse_sweep(bad)


def test_sweep_equals_separate_runs_and_resumes(tiny_lm, text_file, tmp_path):
    res = train(small_cfg(text_file, tmp_path / "sweep"), sweep="k=4,8 expansion_factor=2",
                lm=tiny_lm, progress=False)
    assert [p.name for p in res["runs"]] == ["k4-x2", "k8-x2"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"] == [
        "k4-x2", "k8-x2"]
    for name, k in [("k4-x2", 4), ("k8-x2", 8)]:
        cfg = small_cfg(text_file, tmp_path / f"alone-{name}")
        cfg.sae.k, cfg.sae.expansion_factor = k, 2
        train(cfg, lm=tiny_lm, progress=False)
        a, b = weights(tmp_path / "sweep" / name), weights(tmp_path / f"alone-{name}")
        assert all(torch.equal(a[n], b[n]) for n in a), name
        assert (tmp_path / "sweep" / name / "summary.json").is_file()

    def stop_at_5(trainer):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    part = train(small_cfg(text_file, tmp_path / "part"), sweep="k=4,8 expansion_factor=2",
                 lm=tiny_lm, on_step=stop_at_5, progress=False)
    assert not part["finished"]
    done = train(resume=tmp_path / "part", lm=tiny_lm, progress=False)
    assert done["finished"]
    for name in ("k4-x2", "k8-x2"):
        a, b = weights(tmp_path / "sweep" / name), weights(tmp_path / "part" / name)
        assert all(torch.equal(a[n], b[n]) for n in a), name


def _cli(tiny_model_dir, text_file, out):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file),
            "--ctx-len", "32", "--batch-size", "4", "--tokens", str(4 * 32 * 6),
            "--expansion-factor", "2", "--k", "4", "--out", str(out), "--eval-tokens", "0",
            "--sae-matmul-dtype", "float32", "--dead-tokens", "200", "--save-every", "4"]


def test_two_rank_torchrun_matches_one_process(tiny_model_dir, text_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "mlsae"] + _cli(tiny_model_dir, text_file,
                         tmp_path / "one"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                          "2", "--master_port", "29517", "-m", "mlsae"]
                         + _cli(tiny_model_dir, text_file, tmp_path / "two"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    rows_a = [json.loads(r) for r in (tmp_path / "one" / "metrics.jsonl").open()]
    rows_b = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").open()]
    assert [r["tokens"] for r in rows_a] == [r["tokens"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4
    state = json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and state["sequences"] == 24


def test_activation_cache_equals_streaming(tiny_lm, tiny_model_dir, text_file, tmp_path):
    from safetensors import safe_open

    from mlsae.activations.cache import read_manifest, write_cache
    from mlsae.config import DataConfig
    from mlsae.lm import load_lm

    lm = load_lm(str(tiny_model_dir))
    data = DataConfig(dataset=str(text_file), ctx_len=32)
    write_cache(str(tiny_model_dir), tmp_path / "cache", 4 * 32 * 12, data=data,
                store_dtype="float32", batch_size=4, shard_sequences=10, progress=False)
    man = read_manifest(tmp_path / "cache")
    assert man["layers"] == [0, 1, 2, 3] and man["sequences"] == 48 and len(man["shards"]) == 4
    with safe_open(str(tmp_path / "cache" / "shard_00000.safetensors"), "pt") as f:
        assert f.get_tensor("acts").shape[:1] == (4,) and f.get_tensor("acts").shape[2] == 32
    stream = small_cfg(text_file, tmp_path / "stream", model=str(tiny_model_dir))
    train(stream, lm=lm, progress=False)
    cached = small_cfg(text_file, tmp_path / "cached", activations=str(tmp_path / "cache"),
                       cache_shuffle=False)
    res = train(cached, progress=False)
    a, b = weights(tmp_path / "stream"), weights(tmp_path / "cached")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert res["summary"] is not None
    cfg = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert cfg["model"] == str(tiny_model_dir) and cfg["layers"] == [0, 1, 2, 3]
    shuffled = small_cfg(text_file, tmp_path / "shuf", activations=str(tmp_path / "cache"))
    train(shuffled, progress=False)
    c = weights(tmp_path / "shuf")
    assert not torch.equal(a["W_dec"], c["W_dec"])
