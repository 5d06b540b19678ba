#!/usr/bin/env bash
# Sparge on FlashAttention-4, one H200: checks, the bench at both block shapes, the GPU tests it touches.
# Usage: bash benchmarks/sparge_fa4_check.sh OUTDIR [STEP ...]; steps: bench64 check bench128 tests (default: all).
# Expects FA4 in /tmp/site (the wheelhouse) and .commit (sender's git rev-parse, -dirty if needed).
set -u
out=${1:?usage: sparge_fa4_check.sh OUTDIR [STEP ...]}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 GIT_DIR=/nonexistent
steps=${*:-bench64 check bench128 tests}
step() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; local t0=$SECONDS
  ( timeout "$limit" "$@" ) >"$out/$name.log" 2>&1; local rc=$?; echo "=== $name rc=$rc $((SECONDS - t0))s"; }
BENCH=(python3 -m ditfleet bench sparge --inputs structured --warmup 1 --iters 5)
for s in $steps; do case $s in
  check) step check 45 python3 benchmarks/sparge_fa4_check.py "$out/check.json" 720p81;;
  bench64) step bench64 110 "${BENCH[@]}" --cases 480p81 720p81 --out "$out/sparge_h200_bk64.json";;
  bench128) step bench128 50 "${BENCH[@]}" --cases 720p81 --block-k 128 --out "$out/sparge_h200_bk128.json";;
  tests) step tests 190 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sparge_gpu.py tests/gpu/test_radial_gpu.py \
           tests/gpu/test_attention_gpu.py -k "sparge or radial or fa4";;
  *) echo "unknown step $s";;
esac; done
for s in $steps; do echo "----- $s"; case $s in
  check) grep "^\[check\]" "$out/check.log" | tail -6;;
  bench64|bench128) sed -n '/^case /,$p' "$out/$s.log" | head -20; grep -E "failed|Error" "$out/$s.log" | head -5;;
  tests) tail -15 "$out/tests.log";;
esac; done
