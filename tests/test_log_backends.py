"""`--log tensorboard|wandb`: the same scalars as metrics.jsonl, per layer, read back from the
real packages' files (TensorBoard event files; W&B offline run files)."""

import importlib.util
import json

import pytest

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.errors import UserError
from mlsae.train import RunConfig, train
from mlsae.train.log_backends import parse, scalars


def cfg(text_file, out, log):
    return RunConfig(SAEConfig(expansion_factor=2, k=4),
                     DataConfig(dataset=str(text_file), ctx_len=32),
                     TrainConfig(model="tiny", layers="0,2", tokens=4 * 32 * 4, batch_size=4,
                                 log_every=2, eval_tokens=0, dead_tokens=100, out=str(out),
                                 log=log))


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


def test_log_spec_parsing():
    assert parse("jsonl") == [] and parse("tensorboard,wandb") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="choose from"):
        parse("mlflow")
    scal = scalars({"step": 2, "loss": 1.0, "layers": [3, 5], "fvu": [0.1, 0.2],
                    "l0": [4, 5]})
    assert scal == {"loss": 1.0, "fvu/layer_3": 0.1, "fvu/layer_5": 0.2, "l0/layer_3": 4.0,
                    "l0/layer_5": 5.0}
