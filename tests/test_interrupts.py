"""Runs that are stopped, preempted or crash: SIGTERM like Ctrl-C, a signal to ONE torchrun rank,
a kill between the two renames of a checkpoint swap, a crash after a metrics line, a full disk,
file systems without hard links, and the NCCL start-up order."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import torchrun_rank_pids
from safetensors.torch import load_file
from test_train import small_cfg

from mlsae.cli import main
from mlsae.train import checkpoint as ckpt_mod
from mlsae.train import distributed, train


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def steps_logged(run: Path) -> list[int]:
    return [json.loads(r)["step"] for r in (run / "metrics.jsonl").open()]


def test_sigterm_saves_like_ctrl_c_and_resumes_exactly(tiny_lm, text_file, tmp_path):
    full = train(small_cfg(text_file, tmp_path / "full"), lm=tiny_lm, progress=False)

    def sigterm_at_4(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM / Kubernetes send

    part = train(small_cfg(text_file, tmp_path / "part"), lm=tiny_lm, on_step=sigterm_at_4,
                 progress=False)
    assert not part["finished"] and part["stopped_by"] == "SIGTERM"
    state = json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    train(resume=tmp_path / "part", lm=tiny_lm, progress=False)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert full["finished"]


def _cli(model_dir, text_file, out, tokens):
    return ["train", "--model", str(model_dir), "--dataset", str(text_file), "--ctx-len", "32",
            "--batch-size", "4", "--tokens", str(tokens), "--expansion-factor", "2", "--k",
            "4", "--log-every", "1", "--save-every", "1000", "--eval-tokens", "0",
            "--device", "cpu", "--out", str(out)]


def _wait_for_log(run: Path, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        assert time.time() - t0 < timeout, "training never logged a step"
        time.sleep(0.1)


def test_cli_sigterm_exits_143_with_checkpoint(tiny_model_dir, text_file, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlsae", *_cli(tiny_model_dir, text_file,
                             run, 4 * 32 * 100000)], env=env, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_log(run, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert time.time() - t0 < 30
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 1 and not state["finished"]
    assert steps_logged(run)[-1] == state["step"]


def test_signal_to_one_torchrun_rank_stops_all_ranks_at_one_step(tiny_model_dir, text_file,
                                                                   tmp_path):
    run = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", "29531", "-m", "mlsae",
                             *_cli(tiny_model_dir, text_file, run, 4 * 32 * 100000)],
                            env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_log(run, proc)
    pids = torchrun_rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    t0 = time.time()
    os.kill(pids[1], signal.SIGINT)  # Ctrl-C reaching rank 1 only
    _, err = proc.communicate(timeout=90)  # before the fix: hung forever
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert not state["finished"] and state["step"] >= 1
    assert state["sequences"] == 4 * state["step"]  # one consistent position for all ranks
    assert steps_logged(run)[-1] == state["step"]


def test_kill_between_checkpoint_renames_falls_back_to_previous(tiny_lm, text_file, tmp_path):
    run = tmp_path / "run"

    def stop_at_5(trainer):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    train(small_cfg(text_file, run), lm=tiny_lm, on_step=stop_at_5, progress=False)
    # what a kill after the first rename of a swap leaves: no checkpoint/, the old one aside
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    res = train(resume=run, lm=tiny_lm, progress=False)
    assert res["finished"]
    full = train(small_cfg(text_file, tmp_path / "full"), lm=tiny_lm, progress=False)
    a, b = weights(run), weights(full["run_dir"])
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_crash_after_logging_leaves_no_duplicate_steps(tiny_lm, text_file, tmp_path):
    run = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash_at_8(trainer):  # after step 8 was logged, before its checkpoint (save_every 5)
        if trainer.step == 8:
            raise Crash

    with pytest.raises(Crash):
        train(small_cfg(text_file, run, log_every=1), lm=tiny_lm, on_step=crash_at_8,
              progress=False)
    assert steps_logged(run)[-1] == 8
    train(resume=run, lm=tiny_lm, progress=False)
    assert steps_logged(run) == list(range(1, 13))


def test_full_disk_gives_one_line_and_keeps_previous_checkpoint(tiny_model_dir, text_file,
                                                                tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def flaky_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (2 files) succeeds, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save)
    args = _cli(tiny_model_dir, text_file, run, 4 * 32 * 6)
    args[args.index("--save-every") + 1] = "2"
    assert main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlsae")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "previous checkpoint is kept" in err[0] and "Traceback" not in err[0]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert not [p for p in run.iterdir() if p.name.startswith(".checkpoint.")]


def test_no_hard_links_copies_model_files(tiny_lm, text_file, tmp_path, monkeypatch):
    def no_link(*_a, **_k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    run = tmp_path / "run"
    train(small_cfg(text_file, run, eval_tokens=0), lm=tiny_lm, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (run / name).read_bytes() == (run / "checkpoint" / name).read_bytes()


def test_cuda_rank_device_is_set_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_owned", {"group": False})
    d, device = distributed.init_from_env(torch.device("cuda"))
    assert device == torch.device("cuda", 1) and (d.rank, d.world) == (1, 2)
    assert [c[0] for c in calls] == ["set_device", "init"]
    assert calls[1][1]["backend"] == "nccl"
    assert calls[1][1]["timeout"].total_seconds() >= 3600
