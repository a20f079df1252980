"""`--log tensorboard|wandb`: the same scalars as metrics.jsonl, per layer, read back from the
real packages' files (TensorBoard event files; W&B offline run files)."""

import importlib.util
import json
import os
import signal

import pytest

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.cli import main
from mlsae.errors import OptionError, UserError
from mlsae.train import RunConfig, train
from mlsae.train.log_backends import WANDB_RUN_ID, parse, scalars


def cfg(text_file, out, log, steps=4):
    return RunConfig(SAEConfig(expansion_factor=2, k=4),
                     DataConfig(dataset=str(text_file), ctx_len=32),
                     TrainConfig(model="tiny", layers="0,2", tokens=4 * 32 * steps,
                                 batch_size=4, log_every=2, eval_tokens=0, dead_tokens=100,
                                 out=str(out), log=log))


def jsonl(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (extra: logging)")
def test_tensorboard_scalars_equal_metrics_jsonl(tiny_lm, text_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(cfg(text_file, run, "tensorboard"), lm=tiny_lm, progress=False)
    rows = jsonl(run)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "fvu_mean", "fvu/layer_0", "fvu/layer_2", "l0/layer_2", "lr"} <= tags
    for tag in ("loss", "fvu/layer_2", "l0/layer_0", "dead_fraction"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx(
            [scalars(r)[tag] for r in rows], rel=1e-6)


def wandb_history(path) -> list[dict]:
    """The history records of an offline W&B run file, read independently of wandb's own
    code: a 7-byte header, then a LevelDB-style log (32 KiB blocks, 7-byte chunk headers)
    of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (extra: logging)")
def test_wandb_offline(tiny_lm, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(cfg(text_file, run, "wandb"), lm=tiny_lm, progress=False)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    rows = jsonl(run)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        want = scalars(r)
        assert {k: h[k] for k in want} == pytest.approx(want, rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (extra: logging)")
def test_wandb_resume_continues_the_same_run(tiny_lm, text_file, tmp_path, monkeypatch):
    """`--resume` logs into the W&B run the first start created (its id kept in the run
    folder), from the step after the checkpoint; offline, each start is one run file of it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"

    def sigint_at_4(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps

    part = train(cfg(text_file, run, "wandb", steps=8), lm=tiny_lm, on_step=sigint_at_4,
                 progress=False)
    assert not part["finished"]
    run_id = (run / WANDB_RUN_ID).read_text().strip()
    assert run_id
    assert train(resume=run, lm=tiny_lm, progress=False)["finished"]
    assert (run / WANDB_RUN_ID).read_text().strip() == run_id
    starts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(f"-{run_id}" in d.name for d in starts)  # -1: same second
    files = [next(d.glob("run-*.wandb")) for d in starts]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)
    steps = [[h["_step"] for h in wandb_history(f)] for f in files]
    assert steps == [[2, 4], [6, 8]]
    assert [r["step"] for r in jsonl(run)] == [2, 4, 6, 8]


def test_bad_log_names_the_field_in_python_and_the_flag_on_the_cli(tiny_model_dir, text_file,
                                                                    tmp_path, capsys):
    """Caught before any model loads: a Python caller reads the config field, the CLI the
    flag."""
    with pytest.raises(OptionError) as e:
        train(cfg(text_file, tmp_path / "a", "mlflow"), progress=False)  # model "tiny": unloaded
    assert str(e.value).startswith("TrainConfig.log 'mlflow': choose from jsonl, tensorboard")
    assert "--log" not in str(e.value) and isinstance(e.value, (UserError, ValueError))
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                 "--log", "mlflow", "--out", str(tmp_path / "b"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("mlsae train: error: --log 'mlflow': choose from jsonl, tensorboard")
    assert "TrainConfig" not in err


def test_log_spec_parsing():
    assert parse("jsonl") == [] and parse("tensorboard,wandb") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="choose from"):
        parse("mlflow")
    scal = scalars({"step": 2, "loss": 1.0, "layers": [3, 5], "fvu": [0.1, 0.2],
                    "l0": [4, 5]})
    assert scal == {"loss": 1.0, "fvu/layer_3": 0.1, "fvu/layer_5": 0.2, "l0/layer_3": 4.0,
                    "l0/layer_5": 5.0}


def test_every_flag_error_reads_as_a_keyword_in_python_and_a_flag_on_the_cli(
        tiny_model_dir, text_file, tmp_path, capsys):
    """Any UserError: `str()` (what a Python caller sees) names keywords (`k`, `ctx_len`), the
    CLI line the flags; a suggested command line in backticks is left whole."""
    from mlsae.errors import python_wording

    bad = cfg(text_file, tmp_path / "a", "jsonl")
    bad.sae.k = 0
    with pytest.raises(UserError) as e:
        train(bad, progress=False)
    assert str(e.value) == "k must be positive, got 0"
    assert e.value.cli_message() == "--k must be positive, got 0"
    code = main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file),
                 "--k", "0", "--ctx-len", "32", "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "mlsae train: error: --k must be positive, got 0"
    assert python_wording("--tokens and --batch-size; see `mlsae x --out DIR`; "
                          "runs/hub/a--b") == ("tokens and batch_size; see `mlsae x --out DIR`; "
                                               "runs/hub/a--b")
