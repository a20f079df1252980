"""`--revision` and `--blocks` reach the LM in `mlsae cache` and `mlsae baselines` as they do
in `mlsae train` (issue 12), and are recorded: in the cache manifest (a run trained from the
cache adopts them) and in the baselines' run configs."""

import json

import pytest
from test_evaluate import run_cfg

import mlsae.activations.cache as cache_mod
import mlsae.baselines as baselines_mod
from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.activations.cache import read_manifest
from mlsae.cli import main
from mlsae.errors import UserError
from mlsae.train import RunConfig, train
from mlsae.train.plan import adopt_cache_manifest

BAD = "--blocks 'model.nope': LlamaForCausalLM has no ModuleList"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def seen_load_lm(monkeypatch):
    """Record every load_lm call of the cache and baselines modules (then load for real)."""
    calls = []
    real = cache_mod.load_lm

    def spy(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "load_lm", spy)
    monkeypatch.setattr(baselines_mod, "load_lm", spy)
    return calls


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if ln.startswith("mlsae")]
    assert len(err) == 1, err
    return err[0]


def cache_args(model_dir, text_file, out, *extra):
    return ["cache", "--model", str(model_dir), "--dataset", str(text_file), "--ctx-len", "32",
            "--tokens", "128", "--batch-size", "4", "--out", str(out), "--device", "cpu",
            *extra]


def test_cache_blocks_and_revision_reach_the_lm_and_the_manifest(
        tiny_model_dir, text_file, tmp_path, capsys, seen_load_lm):
    assert main(cache_args(tiny_model_dir, text_file, tmp_path / "bad", "--blocks",
                           "model.nope")) == 2
    assert BAD in one_error_line(capsys)
    assert main(cache_args(tiny_model_dir, text_file, tmp_path / "c", "--blocks",
                           "model.layers", "--revision", "main")) == 0
    args, _ = seen_load_lm[-1]
    assert args[3:] == ("main", "model.layers")  # load_lm(model, device, dtype, rev, blocks)
    manifest = read_manifest(tmp_path / "c")
    assert manifest["blocks"] == "model.layers" and manifest["revision"] == "main"

    # a run trained from the cache takes them; a different one given is refused
    cfg = RunConfig(train=TrainConfig(activations=str(tmp_path / "c")))
    adopt_cache_manifest(cfg, manifest)
    assert (cfg.train.blocks, cfg.train.revision) == ("model.layers", "main")
    with pytest.raises(UserError, match="blocks 'layers' disagrees with the activation "
                       "cache's 'model.layers'"):
        adopt_cache_manifest(RunConfig(), manifest, {"blocks": "layers"})


def test_baselines_blocks_reach_the_lm_and_the_baseline_configs(
        tiny_lm, tiny_model_dir, text_file, tmp_path, capsys, seen_load_lm):
    run = tmp_path / "run"
    train(run_cfg(tiny_model_dir, text_file, run, tokens=4 * 32 * 2), lm=tiny_lm,
          progress=False)
    base = ["baselines", str(run), "--tokens", "128", "--device", "cpu", "--batch-size", "4"]
    assert main(base + ["--blocks", "model.nope"]) == 2
    assert BAD in one_error_line(capsys)
    assert not (run / "baselines").exists()
    assert main(base + ["--blocks", "model.layers"]) == 0, capsys.readouterr().err
    args, _ = seen_load_lm[-1]
    assert args[3:] == (None, "model.layers")  # the run's revision (none), the given blocks
    for layer in (0, 1):
        state = json.loads((run / "baselines" / f"layer_{layer}" / "checkpoint" /
                            "state.json").read_text())
        assert state["config"]["train"]["blocks"] == "model.layers"
        assert state["config"]["train"]["layers"] == str(layer)


def test_older_cache_without_revision_or_blocks_keeps_the_runs():
    """A manifest written before `revision`/`blocks` were recorded: the run's values stand
    (a resumed run that recorded --blocks keeps loading), nothing is refused."""
    cfg = RunConfig(SAEConfig(), DataConfig(), TrainConfig(blocks="model.layers",
                                                           revision="step1000"))
    old = {"model": "m", "layers": [0, 1], "data": DataConfig().__dict__}
    adopt_cache_manifest(cfg, old, {"blocks": "model.layers"})
    assert (cfg.train.blocks, cfg.train.revision) == ("model.layers", "step1000")
    new = dict(old, blocks=None, revision=None)
    with pytest.raises(UserError, match="revision 'step1000' disagrees"):
        adopt_cache_manifest(cfg, new, {"blocks": "model.layers"})
