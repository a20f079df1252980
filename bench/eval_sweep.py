"""Evaluation at sweep scale (issue 21), in ONE run of this script:

1. "release": each checkpoint evaluated by its own `mlsae eval` process of the last release
   (a git worktree of --release, run in that folder with PYTHONPATH on it and this .venv;
   checked to import the release's mlsae), float32;
2. "together": one `mlsae eval` process of the current code evaluating every checkpoint in
   one pass (float32, --no-cache, so nothing is reused from an earlier run);
3. "together, --dtype auto": the same joint call with the LM in bfloat16 where the CPU
   computes it natively (`--together-auto`; its numbers are compared with the release's);
4. "alone": the current code on the first checkpoint alone, float32 and --dtype auto
   (`--skip-alone` leaves this pair out).

Same text for all (--tokens of each run's held-out split), same OMP_NUM_THREADS. Prints every
wall time, the ratios, the largest difference between the release's and the joint eval.json
values (float32: want exactly 0.0), and per layer how far --dtype auto moved FVU, dCE and KL
of the first checkpoint. Every process's wall time includes its start and the LM load, as a
user waits for it; its CPU time (user + sys) is printed too, a steadier measure of the work
on a shared machine. `--layers`: evaluate only these layers in the release-vs-together part.
`--wait-for FILE`: before step 2, wait until FILE exists (the release half can start while
the new code is finished; the commit each step ran is printed).

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_sweep.py runs/default-150k runs/sweep-20k \\
        --release b78853b --tokens 2048 --out /tmp/eval_sweep
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"checkpoint", "seconds", "out", "options", "lm_dtype"}


def checkpoints(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        meta = Path(p) / "sweep.json"
        out += ([str(Path(p) / n) for n in json.loads(meta.read_text())["runs"]]
                if meta.is_file() else [p])
    return out


def worktree(rev: str) -> Path:
    path = Path(f"/tmp/mlsae-{rev}")
    if not (path / "mlsae" / "evaluate.py").is_file():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                       check=True)
    return path


def imported_from(py: str, env: dict, cwd: Path) -> Path:
    """Where `python -m mlsae` run in `cwd` with `env` imports mlsae from. `-m` puts the
    working directory first on sys.path, ahead of PYTHONPATH: run from this checkout, the
    "release" would silently be the current code (it was, in this script's first version)."""
    out = subprocess.run([py, "-c", "import mlsae; print(mlsae.__file__)"], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out).resolve().parent.parent


def timed(argv: list[str], env: dict, log: Path, cwd: Path = ROOT) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + sys) of one process run to its end in `cwd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(argv, env=env, cwd=cwd, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"{' '.join(argv)} failed ({rc}): see {log}")
    return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def diff(a, b, path="") -> float:
    """Largest absolute difference between two eval.json values (inf where they differ in
    structure or in a non-number)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) - SKIP != set(b) - SKIP:
            return float("inf")
        return max([diff(a[k], b[k], k) for k in a if k not in SKIP] or [0.0])
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf")
        return max([diff(x, y, path) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def git_state() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "mlsae"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" + uncommitted changes in mlsae/" if dirty else "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="checkpoints or sweep folders; the first is 'alone'")
    p.add_argument("--release", default="b78853b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", help="--layers of the release-vs-together part (default: all); "
                   "the alone float32 / auto pair always evaluates every layer")
    p.add_argument("--out", default="/tmp/eval_sweep")
    p.add_argument("--wait-for", help="file to wait for before the current code's half")
    p.add_argument("--skip-release", action="store_true",
                   help="reuse the release half's files and times already in --out")
    p.add_argument("--together-auto", action="store_true",
                   help="also time the joint call with --dtype auto (sharing and bf16 together)")
    p.add_argument("--skip-alone", action="store_true",
                   help="leave out the alone float32 / auto pair (every layer of one run)")
    args = p.parse_args()
    cks = [str(Path(c).resolve()) for c in checkpoints(args.runs)]
    out = Path(args.out).resolve()
    for sub in ("release", "together", "together_auto", "alone32", "auto"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    py = str(ROOT / ".venv" / "bin" / "python")
    base_env = dict(os.environ, MLSAE_CPU_BF16="1")
    alone_flags = ["--tokens", str(args.tokens)]
    common = alone_flags + (["--layers", args.layers] if args.layers else [])
    names = [Path(c).name for c in cks]
    report: dict = {"checkpoints": cks, "tokens": args.tokens, "layers": args.layers or "all",
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(torch default)"),
                    "cpu": next((ln.split(":", 1)[1].strip() for ln in
                                 Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name")), "?"),
                    "nproc": os.cpu_count()}

    times_path = out / "release_times.json"
    if args.skip_release and times_path.is_file():
        release = json.loads(times_path.read_text())
        if release.get("imported_from") != str(worktree(args.release)):
            sys.exit(f"{times_path} was not written by release processes that imported "
                     f"{args.release}'s worktree (an older version of this script): rerun "
                     "without --skip-release")
    else:
        tree = worktree(args.release)
        env = dict(base_env, PYTHONPATH=str(tree))
        if imported_from(py, env, tree) != tree.resolve():
            sys.exit(f"the release processes would not import mlsae from {tree}")
        release = {"rev": args.release, "seconds": [], "cpu_s": [], "load": [],
                   "imported_from": str(tree)}
        for c, n in zip(cks, names):
            release["load"].append(load())
            t, cpu = timed([py, "-m", "mlsae", "eval", c, *common, "--out",
                            str(out / "release" / f"{n}.json")], env,
                           out / "release" / f"{n}.log", cwd=tree)
            release["seconds"].append(round(t, 1))
            release["cpu_s"].append(round(cpu, 1))
            print(f"release {args.release} {n}: {t:.1f} s wall, {cpu:.1f} s CPU (load "
                  f"{release['load'][-1]})", flush=True)
        times_path.write_text(json.dumps(release))
    report["release"] = dict(release, total_s=round(sum(release["seconds"]), 1),
                             total_cpu_s=round(sum(release["cpu_s"]), 1))

    if args.wait_for:
        t0 = time.perf_counter()
        while not Path(args.wait_for).exists():
            time.sleep(10)
        report["waited_s"] = round(time.perf_counter() - t0)
    if imported_from(py, base_env, ROOT) != ROOT:
        sys.exit(f"the current-code processes would not import mlsae from {ROOT}")
    report["current_code"] = git_state()
    print(f"current code: {report['current_code']}", flush=True)

    ld = load()
    t, cpu = timed([py, "-m", "mlsae", "eval", *cks, *common, "--no-cache", "--out-dir",
                    str(out / "together")], base_env, out / "together.log")
    report["together"] = {"seconds": round(t, 1), "cpu_s": round(cpu, 1), "load": ld}
    print(f"together ({len(cks)} checkpoints, one process): {t:.1f} s wall, {cpu:.1f} s CPU "
          f"(load {ld})", flush=True)

    if args.together_auto:
        ld = load()
        t, cpu = timed([py, "-m", "mlsae", "eval", *cks, *common, "--no-cache", "--dtype",
                        "auto", "--out-dir", str(out / "together_auto")], base_env,
                       out / "together_auto.log")
        report["together_auto"] = {"seconds": round(t, 1), "cpu_s": round(cpu, 1), "load": ld}
        print(f"together --dtype auto: {t:.1f} s wall, {cpu:.1f} s CPU (load {ld})", flush=True)
        report["ratio_release_total_over_together_auto"] = {
            "wall": round(report["release"]["total_s"] / t, 2),
            "cpu": round(report["release"]["total_cpu_s"] / cpu, 2)}
        report["together_auto_vs_release_max_rel"] = {
            key: max(rel_moves(json.loads((out / "release" / f"{n}.json").read_text()),
                               json.loads((out / "together_auto" / f"{n}.json").read_text()),
                               key) for n in names)
            for key in ("fvu", "dce", "kl", "ce_clean", "ce_recon")}

    for sub, dtype in (() if args.skip_alone else (("alone32", "float32"), ("auto", "auto"))):
        ld = load()
        t, cpu = timed([py, "-m", "mlsae", "eval", cks[0], *alone_flags, "--no-cache",
                        "--dtype", dtype, "--out", str(out / sub / f"{names[0]}.json")],
                       base_env, out / f"{sub}.log")
        report[sub] = {"seconds": round(t, 1), "cpu_s": round(cpu, 1), "load": ld}
        print(f"alone {names[0]} --dtype {dtype}: {t:.1f} s wall, {cpu:.1f} s CPU (load {ld})",
              flush=True)

    diffs = {}
    for n in names:
        a = json.loads((out / "release" / f"{n}.json").read_text())
        b = json.loads((out / "together" / f"{n}.json").read_text())
        diffs[n] = diff(a, b)
    report["max_abs_diff_release_vs_together"] = diffs
    report["ratio_release_total_over_together"] = {
        "wall": round(report["release"]["total_s"] / report["together"]["seconds"], 2),
        "cpu": round(report["release"]["total_cpu_s"] / report["together"]["cpu_s"], 2)}
    if args.skip_alone:
        finish(report, out)
        return
    a32 = json.loads((out / "alone32" / f"{names[0]}.json").read_text())
    report["ratio_alone32_over_auto"] = {
        "wall": round(report["alone32"]["seconds"] / report["auto"]["seconds"], 2),
        "cpu": round(report["alone32"]["cpu_s"] / report["auto"]["cpu_s"], 2)}
    bf = json.loads((out / "auto" / f"{names[0]}.json").read_text())
    report["auto_lm_dtype"] = bf.get("lm_dtype")
    moved = {}
    for key in ("fvu", "dce", "kl", "ce_clean", "ce_recon"):
        x, y = a32["per_layer"][key], bf["per_layer"][key]
        moved[key] = {"max_rel": rel_moves(a32, bf, key),
                      "per_layer_rel": [round((v - u) / u, 5) if u else None
                                        for u, v in zip(x, y)]}
    report["auto_vs_float32"] = moved
    finish(report, out)
    print(json.dumps({k: {"max_rel": v["max_rel"]} for k, v in moved.items()}))


def rel_moves(a: dict, b: dict, key: str) -> float:
    """Largest relative change of eval.json's per-layer `key` from `a` to `b`."""
    x, y = a["per_layer"][key], b["per_layer"][key]
    return max(abs(v - u) / abs(u) for u, v in zip(x, y) if u)


def finish(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "auto_vs_float32"}))
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
