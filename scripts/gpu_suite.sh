#!/usr/bin/env bash
# Build jax_ep with its CUDA extension on a GPU machine, then run the main job, the GPU test
# suite and the benchmark. Logs go to $OUT (or /tmp/jax_ep_out).
#   scripts/gpu_suite.sh [all|build|demo|test|moe|multiprocess|bench|layer] [extra args...]
#     test: the communication kernels (tests/test_gpu.py); moe: grouped matmul, MoE layer and
#     training tests on GPUs; bench: dispatch/combine benchmark; layer: MoE layer benchmark
#   scripts/gpu_suite.sh tune "-DJAX_EP_SEND_UNROLL=8" "-DJAX_EP_THREADS=1024" ...
#     builds each variant of the kernels' compile-time knobs (cuda/intranode.cu) into its own
#     folder and benchmarks it (jax_ep only, --num-sms from $TUNE_SMS, default "48 96").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jax_ep_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
step=${1:-all}
shift || true
status=0

build() {
  nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1
  nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
  if ! python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  grep -E "jax_ep:|warning|spill" "$OUT/build.log" | head -40
  python3 -c "import jax, jax_ep_cuda; print('extension ok;', len(jax.devices()), 'devices')"
}
# Run from outside the checkout so the installed package is the one imported.
demo() { (cd /tmp && python3 -m jax_ep.demo) 2>&1 | tee "$OUT/demo.log"; status=$((status | PIPESTATUS[0])); }
tests() {
  (cd /tmp && timeout 900 python3 -m pytest -m gpu -x -q -rs "$OLDPWD/tests/test_gpu.py" "$@") 2>&1 \
    | tee "$OUT/gpu_tests.log"; status=$((status | PIPESTATUS[0]))
}
moe_tests() {
  (cd /tmp && timeout 900 python3 -m pytest -m gpu -q -rs "$OLDPWD/tests/test_grouped_matmul.py" \
    "$OLDPWD/tests/test_gpu_moe.py" "$OLDPWD/tests/test_train.py" "$@") 2>&1 \
    | tee "$OUT/gpu_moe_tests.log"; status=$((status | PIPESTATUS[0]))
}
layer() {
  (cd /tmp && python3 -m jax_ep.bench layer --plot "$OUT/layer_bench.png" --json "$OUT/layer_bench.json" "$@") \
    2>&1 | tee "$OUT/layer_bench.log"; status=$((status | PIPESTATUS[0]))
}
# One process per GPU (jax.distributed); last in "all": a machine once stopped answering
# during this test before it had ever passed.
multiprocess() {
  (cd /tmp && timeout 300 python3 -m pytest -m gpu -x -q -rs "$OLDPWD/tests/test_gpu_multiprocess.py") \
    2>&1 | tee "$OUT/gpu_multiprocess.log"; status=$((status | PIPESTATUS[0]))
}
bench() { (cd /tmp && python3 -m jax_ep.bench "$@") 2>&1 | tee "$OUT/bench.log"; status=$((status | PIPESTATUS[0])); }

tune() {
  for flags in "$@"; do
    dir=/tmp/jax_ep_tune_$(echo "$flags" | tr -c 'A-Za-z0-9' _)
    cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="$flags" \
      -DPython_EXECUTABLE="$(command -v python3)" > "$dir.log" 2>&1 \
      && cmake --build "$dir" -j16 >> "$dir.log" 2>&1 || { tail -20 "$dir.log"; continue; }
    echo "=== variant: ${flags:-default}"
    (cd /tmp && PYTHONPATH="$dir" python3 -m jax_ep.bench --skip-baselines \
      --num-sms ${TUNE_SMS:-48 96} --iters 10) 2>&1 | grep -E "^jax_ep cuda|received rows" \
      | tee -a "$OUT/tune.log"
  done
}

case "$step" in
  build) build ;;
  demo) build; demo ;;
  test) build; tests "$@" ;;
  moe) build; moe_tests "$@" ;;
  layer) build; layer "$@" ;;
  bench) build; bench "$@" ;;
  multiprocess) build; multiprocess ;;
  tune) tune "$@" ;;
  all) build; demo; tests; moe_tests; bench; layer; multiprocess ;;
  *) echo "usage: $0 [all|build|demo|test|moe|multiprocess|bench|layer|tune]"; exit 2 ;;
esac
exit $status
