"""Run folders written before issue 12's fields existed (no shuffle_buffer, prepend_bos,
exclude_outliers, dataset_config, data_files, python_version, revision, blocks; no
data_index.jsonl) still load and resume, with their old data order: the resumed run ends
bit-identical to an uninterrupted run of the same old config."""

import json
import os
import signal

import torch
from safetensors.torch import load_file

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.sae import MLSAE
from mlsae.train import RunConfig, train

NEW_DATA = ("shuffle_buffer", "prepend_bos", "exclude_outliers", "dataset_config",
            "data_files", "python_version")
NEW_TRAIN = ("revision", "blocks")


def legacy_cfg(text_file, out):
    # what an old config's missing fields become
    return RunConfig(SAEConfig(expansion_factor=4, k=8),
                     DataConfig(dataset=str(text_file), ctx_len=32, shuffle_buffer=None,
                                prepend_bos=False, exclude_outliers=0.0),
                     TrainConfig(out=str(out), model="tiny", layers="all", tokens=4 * 32 * 10,
                                 batch_size=4, save_every=5, eval_tokens=0, dead_tokens=300))


def _strip(d: dict) -> None:
    for k in NEW_DATA:
        d["data"].pop(k, None)
    for k in NEW_TRAIN:
        d["train"].pop(k, None)


def test_old_run_folder_loads_and_resumes(tiny_lm, text_file, tmp_path):
    full = train(legacy_cfg(text_file, tmp_path / "full"), lm=tiny_lm, progress=False)
    assert full["finished"]

    def sigint_at_7(trainer):
        if trainer.step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    part = tmp_path / "part"
    stopped = train(legacy_cfg(text_file, part), lm=tiny_lm, on_step=sigint_at_7,
                    progress=False)
    assert not stopped["finished"]
    # make it an old run folder
    state_path = part / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    _strip(state["config"])
    state_path.write_text(json.dumps(state))
    for cfg_path in (part / "checkpoint" / "config.json",):
        c = json.loads(cfg_path.read_text())
        _strip(c["run"])
        cfg_path.write_text(json.dumps(c))
    (part / "data_index.jsonl").unlink(missing_ok=True)
    assert MLSAE.from_pretrained(part).config["run"]["data"].get("shuffle_buffer") is None

    resumed = train(resume=part, lm=tiny_lm, progress=False)
    assert resumed["finished"]
    for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoint" / name))
        b = load_file(str(part / "checkpoint" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
