#!/usr/bin/env bash
# Source trees of kernel variants for one A/B device call (`scripts/gpu_suite.sh variants`):
#   scripts/make_variants.sh DIR NAME=REF [NAME=REF ...]
# writes DIR/NAME/ for each git REF (a commit, branch or tag of this repository: its cuda/,
# ffi/, jax_ep/, scripts/, CMakeLists.txt, pyproject.toml and README.md). A NAME ending in
# _trace is also instrumented with per-phase timestamps (scripts/ll_phase_trace/instrument.py).
# Example (the device copy carries .snap):
#   scripts/make_variants.sh .snap/variants main=main flags=ll-chunk-flags main_trace=main
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
dir=$1
shift
rm -rf "$dir"
mkdir -p "$dir"
for spec in "$@"; do
  name=${spec%%=*}
  ref=${spec#*=}
  if [ "$name" = "$spec" ] || [ -z "$name" ] || [ -z "$ref" ]; then
    echo "make_variants.sh: '$spec' is not NAME=REF" >&2
    exit 2
  fi
  mkdir -p "$dir/$name"
  git archive "$ref" cuda ffi jax_ep scripts CMakeLists.txt pyproject.toml README.md | tar -x -C "$dir/$name"
  note=""
  if [[ "$name" == *_trace ]]; then
    python3 scripts/ll_phase_trace/instrument.py "$dir/$name" > /dev/null
    note=", instrumented"
  fi
  echo "$dir/$name: $ref ($(git rev-parse --short "$ref")$note)"
done
