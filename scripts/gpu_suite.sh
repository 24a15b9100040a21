#!/usr/bin/env bash
# Build jax_ep with its CUDA extension on a GPU machine, then run the main job, the GPU test
# suite and the benchmark. Logs go to $OUT (or /tmp/jax_ep_out).
#   scripts/gpu_suite.sh [all|build|demo|test|moe|multiprocess|hardening|soak|sanitizer|bench|decode|layer|variants] [extra args...]
#     test: the communication kernels (tests/test_gpu.py, tests/test_gpu_low_latency.py, the FP8 cast),
#     twice: with XLA command buffers (CUDA graphs) disabled, then enabled for custom calls
#     ($GRAPH_MODES="NO_GRAPHS GRAPHS" by default; one of them alone where a call's 10 minutes
#     hold only one pass, as on 8 GPUs); moe: grouped matmul, MoE layer
#     and training tests on GPUs; bench: dispatch/combine benchmark (reports both command
#     buffer modes); decode: low-latency benchmark (latency, hook overlap, decode step with
#     and without command buffers); layer: MoE layer benchmark; hardening: determinism, a late
#     peer, Buffer lifecycle (tests/test_gpu_hardening.py) and the property tests on the CUDA
#     backend (tests/test_properties.py); soak: scripts/soak.py in both process
#     models (10,000 iterations per mode unless args say otherwise); sanitizer: every CUDA op
#     (scripts/sanitize.py, one process per GPU, no NCCL) under compute-sanitizer's memcheck (leak
#     check on), racecheck and synccheck ($SANITIZER_TOOLS picks, $SANITIZE_RANKS the GPUs); args go to both
#     passes, e.g. --cases normal_rank; variants: A/B kernel experiments in one call: builds
#     every source tree under $VARIANTS_DIR (default variants/, made by scripts/make_variants.sh)
#     side by side, then runs the command given in args (from /tmp: absolute paths) with each,
#     e.g. `variants python3 $PWD/scripts/profile_ops.py --tokens 128 --ops low_latency` or
#     `variants bash -c "python3 -m pytest -m gpu -x -q $PWD/tests/test_gpu_low_latency.py && ..."`
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
  (cd /tmp && python3 -c "import jax, jax_ep._cuda; print('extension ok;', len(jax.devices()), 'devices')")
}
# Run from outside the checkout so the installed package is the one imported.
demo() { (cd /tmp && python3 -m jax_ep.demo) 2>&1 | tee "$OUT/demo.log"; status=$((status | PIPESTATUS[0])); }
# XLA flags of the two command-buffer modes (graph size 1: capture even a lone custom call).
NO_GRAPHS="--xla_gpu_enable_command_buffer="
GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
tests() {
  for mode in ${GRAPH_MODES:-NO_GRAPHS GRAPHS}; do
    echo "=== GPU tests with $mode: ${!mode}"
    (cd /tmp && XLA_FLAGS="${!mode}" timeout 900 python3 -m pytest -m gpu -x -q -rs \
      "$OLDPWD/tests/test_gpu.py" "$OLDPWD/tests/test_gpu_low_latency.py" \
      "$OLDPWD/tests/test_gpu_fp8_cast.py" "$@") 2>&1 \
      | tee "$OUT/gpu_tests_$mode.log"
    status=$((status | PIPESTATUS[0]))
  done
}
moe_tests() {
  (cd /tmp && timeout 900 python3 -m pytest -m gpu -q -rs "$OLDPWD/tests/test_grouped_matmul.py" \
    "$OLDPWD/tests/test_gpu_moe.py" "$OLDPWD/tests/test_train.py" "$@") 2>&1 \
    | tee "$OUT/gpu_moe_tests.log"; status=$((status | PIPESTATUS[0]))
}
decode() {
  (cd /tmp && python3 -m jax_ep.bench decode --json "$OUT/decode_bench.json" "$@") 2>&1 \
    | tee "$OUT/decode_bench.log"; status=$((status | PIPESTATUS[0]))
}
layer() {
  (cd /tmp && python3 -m jax_ep.bench layer --plot "$OUT/layer_bench.png" --json "$OUT/layer_bench.json" "$@") \
    2>&1 | tee "$OUT/layer_bench.log"; status=$((status | PIPESTATUS[0]))
}
# One process per GPU (jax.distributed); last in "all": a machine once stopped answering
# during this test before it had ever passed.
multiprocess() {
  (cd /tmp && timeout 600 python3 -m pytest -m gpu -x -q -rs "$OLDPWD/tests/test_gpu_multiprocess.py" \
    "$OLDPWD/tests/test_gpu_internode_low_latency.py") \
    2>&1 | tee "$OUT/gpu_multiprocess.log"; status=$((status | PIPESTATUS[0]))
}
hardening() {
  (cd /tmp && timeout 900 python3 -m pytest -m gpu -x -q -rs -s "$OLDPWD/tests/test_gpu_hardening.py" \
    "$OLDPWD/tests/test_properties.py" "$@") \
    2>&1 | tee "$OUT/gpu_hardening.log"; status=$((status | PIPESTATUS[0]))
}
# Both process models; internode (2 virtual nodes) in the one-process-per-GPU run.
soak() {
  local n
  n=$(nvidia-smi -L | wc -l)
  (cd /tmp && timeout 1200 python3 "$OLDPWD/scripts/soak.py" "$@") 2>&1 | tee "$OUT/soak_one_process.log"
  status=$((status | PIPESTATUS[0]))
  (cd /tmp && NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_REMOTE_TRANSPORT=none timeout 1200 \
    python3 -m jax_ep.launch -n "$n" -- "$OLDPWD/scripts/soak.py" --num-ranks-per-node $((n / 2)) "$@") \
    2>&1 | tee "$OUT/soak_processes.log"; status=$((status | PIPESTATUS[0]))
}
# The CUDA backend under compute-sanitizer without NCCL (docs/hardening.md, "Memory safety"):
# scripts/sanitize.py saves inputs and reference outputs (to $SANITIZE_DIR) in a normal run,
# then runs the CUDA backend alone under each tool of $SANITIZER_TOOLS and compares. Logs:
# sanitizer_reference.log, sanitizer_<tool>.log, sanitizer_summary.txt (a line per tool).
sanitizer() {
  local dir=${SANITIZE_DIR:-/tmp/jax_ep_sanitize} ranks=${SANITIZE_RANKS:-$(nvidia-smi -L | wc -l)}
  local tool flags rc summary
  if [ "$ranks" -lt 2 ]; then
    echo "sanitizer: skipped: needs 2 GPUs or more"; return
  fi
  rm -rf "$dir"
  : > "$OUT/sanitizer_summary.txt"
  (cd /tmp && timeout 900 python3 "$OLDPWD/scripts/sanitize.py" reference --out "$dir" --ranks "$ranks" "$@") \
    2>&1 | tee "$OUT/sanitizer_reference.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "sanitizer: the reference pass failed ($rc)"; status=1; return; fi
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
    flags="--tool $tool"
    [ "$tool" = memcheck ] && flags="$flags --leak-check full"
    echo "=== compute-sanitizer $flags"
    # One process per GPU: the sanitizer runs a process's kernels one at a time, so in one
    # process a kernel waiting for its peer on another GPU would wait forever. No autotuning:
    # under racecheck XLA ran every candidate kernel instrumented and one compile outlasted
    # sanitize.py's 120 s case limit; the pass checks jax_ep's kernels, not XLA's choices.
    # shellcheck disable=SC2086  # $flags: several words
    (cd /tmp && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout 1800 compute-sanitizer $flags --target-processes all --error-exitcode 99 \
      python3 -m jax_ep.launch -n "$ranks" -- "$OLDPWD/scripts/sanitize.py" cuda --in "$dir" "$@") \
      2>&1 | tee "$OUT/sanitizer_$tool.log"
    rc=${PIPESTATUS[0]}
    status=$((status | rc))
    summary=$(grep -hE "(ERROR|RACECHECK) SUMMARY|^sanitize.py:" "$OUT/sanitizer_$tool.log" \
      | sed 's/^=* *//' | paste -sd ';' -)
    echo "$tool: exit $rc;${summary:- no summary: crashed?}" >> "$OUT/sanitizer_summary.txt"
  done
  echo "=== sanitizer summary"; cat "$OUT/sanitizer_summary.txt"
}
bench() {
  for mode in ${GRAPH_MODES:-NO_GRAPHS GRAPHS}; do
    echo "=== python -m jax_ep.bench with $mode: ${!mode}"
    (cd /tmp && XLA_FLAGS="${!mode}" python3 -m jax_ep.bench "$@") 2>&1 | tee "$OUT/bench_$mode.log"
    status=$((status | PIPESTATUS[0]))
  done
}

# Each variant is built by pip into its own folder (in parallel) and imported from there
# (PYTHONPATH), so no variant replaces another or the installed package.
variants() {
  local dir=${VARIANTS_DIR:-variants} v name target
  if [ ! -d "$dir" ] || [ $# -eq 0 ]; then
    echo "variants: needs $dir/ (scripts/make_variants.sh) and a command to run"; status=1; return
  fi
  for v in "$dir"/*/; do
    name=$(basename "$v")
    rm -rf "/tmp/jax_ep_variants/$name"
    python3 -m pip install --no-build-isolation --no-deps --target "/tmp/jax_ep_variants/$name" "$v" \
      > "$OUT/variant_${name}_build.log" 2>&1 &
  done
  wait
  for v in "$dir"/*/; do
    name=$(basename "$v")
    target=/tmp/jax_ep_variants/$name
    if ! ls "$target"/jax_ep/_cuda*.so > /dev/null 2>&1; then
      echo "=== variant $name: BUILD FAILED"; tail -30 "$OUT/variant_${name}_build.log"; status=1; continue
    fi
    echo "=== variant $name: $*"
    (cd /tmp && PYTHONPATH="$target" "$@") 2>&1 | tee "$OUT/variant_$name.log"
    status=$((status | PIPESTATUS[0]))
  done
}

case "$step" in
  build) build ;;
  demo) build; demo ;;
  test) build; tests "$@" ;;
  moe) build; moe_tests "$@" ;;
  layer) build; layer "$@" ;;
  bench) build; bench "$@" ;;
  decode) build; decode "$@" ;;
  multiprocess) build; multiprocess ;;
  hardening) build; hardening "$@" ;;
  soak) build; soak "$@" ;;
  sanitizer) build; sanitizer "$@" ;;
  variants) variants "$@" ;;
  all) build; demo; tests; hardening; moe_tests; bench; decode; layer; multiprocess ;;
  *) echo "usage: $0 [all|build|demo|test|moe|multiprocess|hardening|soak|sanitizer|bench|decode|layer|variants]"; exit 2 ;;
esac
exit $status
