"""What a stop signal does to a run, measured: SIGTERM to a single-process `mlsae train`, and
SIGINT to ONE rank of a 2-rank torchrun job (gloo, CPU). For each: seconds from the signal to
exit, the exit code, the step saved, and whether resuming ends bit-identical to a run that was
never interrupted. A tiny random Llama stands in for the LM.

    python bench/interrupts.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import save_tiny_model, torchrun_rank_pids  # noqa: E402

STEPS = 60


def cli(model: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--dataset", "pydoc", "--ctx-len", "32",
            "--batch-size", "4", "--tokens", str(4 * 32 * STEPS), "--expansion-factor", "2",
            "--k", "4", "--log-every", "1", "--save-every", "1000", "--eval-tokens", "0",
            "--device", "cpu", "--out", str(out)]


def launcher(ranks: int, port: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "mlsae"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(port), "-m", "mlsae"]


def interrupted(model: Path, out: Path, ranks: int, sig: int, port: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(launcher(ranks, port) + cli(model, out), env=env,
                            stderr=subprocess.DEVNULL)
    log = out / "metrics.jsonl"
    while not log.is_file() or len(log.read_text().splitlines()) < 5:
        time.sleep(0.05)
    target = proc.pid if ranks == 1 else torchrun_rank_pids(proc.pid)[1]
    t0 = time.perf_counter()
    os.kill(target, sig)
    code = proc.wait(timeout=300)
    sec = time.perf_counter() - t0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    last_logged = json.loads(log.read_text().splitlines()[-1])["step"]
    resume = subprocess.run(launcher(ranks, port + 1) + ["train", "--resume", str(out)],
                            env=env, stderr=subprocess.DEVNULL)
    return {"seconds_to_exit": round(sec, 2), "exit_code": code, "step_saved": state["step"],
            "last_logged_step": last_logged, "resume_exit_code": resume.returncode}


def identical(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return all(torch.equal(ta[n], tb[n]) for n in ta)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for ranks, sig, name in ((1, signal.SIGTERM, "SIGTERM, one process"),
                                 (2, signal.SIGINT, "SIGINT to rank 1 of 2 (torchrun)")):
            ref = tmp / f"ref{ranks}"
            subprocess.run(launcher(ranks, 29601) + cli(model, ref), env=env, check=True,
                           stderr=subprocess.DEVNULL)
            res = interrupted(model, tmp / f"int{ranks}", ranks, sig, 29611)
            res["resumed_bit_identical"] = identical(ref, tmp / f"int{ranks}")
            print(f"{name}: {json.dumps(res)}", flush=True)


if __name__ == "__main__":
    main()
