#!/usr/bin/env bash
# The out-of-core checks that need a CUDA device, as one short run (< 8 minutes) for the
# accelerator machine: the CUDA tests of every test file that has CUDA skips, then
# tools/bench_outofcore.py on the device. Results go under $OUT (default ./gpu-check):
# device.txt (nvidia-smi, torch), pytest-cuda.log and .xml, bench-cuda.txt, bench-cpu.txt
# (the same bench on the CPU of the same machine, for a same-machine comparison).
#   OUT=/tmp/out tools/gpu_check.sh        # PYTHON=... to pick the interpreter
# Exit status: non-zero when a CUDA test failed or was skipped (no device seen) or a step
# ran past its time limit; the bench's own "within/OVER" line is in its file.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Time limits (seconds), 7.5 minutes in all: the tests (~1 min on a GPU), then the two
# bench arms on a 16-block model (~2 min each with the page cache dropped).
TESTS_S=180
BENCH_S=120
CUDA_TEST_FILES="tests/test_outofcore.py tests/test_prism_blockfile.py tests/test_prism_store.py
 tests/test_sketch_rng.py tests/test_sketch_workers.py tests/test_ssd_scan.py"
# bench: 16 blocks of d_model 384 (~24M parameters, 94 MiB of weights) under 32 MiB:
# weights ~3x the budget; 2 steps x 2 repeats.
BENCH_ARGS="--d-model 384 --n-layers 16 --budget-mb 32 --steps 2 --repeats 2"
status=0
{
  date -u
  nvidia-smi || echo "nvidia-smi: not found"
  "$PY" -c 'import torch, libp2p, fflnode; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
} >"$OUT/device.txt" 2>&1 || { echo "interpreter lacks torch/libp2p/fflnode: see $OUT/device.txt"; exit 2; }
cat "$OUT/device.txt"

# shellcheck disable=SC2086
timeout "$TESTS_S" "$PY" -m pytest -q -rs -k "cuda or gpu" $CUDA_TEST_FILES \
  --junitxml="$OUT/pytest-cuda.xml" >"$OUT/pytest-cuda.log" 2>&1 || status=1
tail -15 "$OUT/pytest-cuda.log"
if grep -q "SKIPPED" "$OUT/pytest-cuda.log"; then
  echo "some CUDA tests were skipped: no device seen by torch?"; status=1
fi

mkdir -p "$OUT/scratch"
for dev in cuda cpu; do
  # shellcheck disable=SC2086
  timeout "$BENCH_S" "$PY" tools/bench_outofcore.py --dir "$OUT/scratch" --device "$dev" \
    $BENCH_ARGS >"$OUT/bench-$dev.txt" 2>"$OUT/bench-$dev.err" || status=1
  echo "== bench $dev"; cat "$OUT/bench-$dev.txt"
done
rm -rf "$OUT/scratch"  # block files: scratch, and too big to bring back
date -u >>"$OUT/device.txt"
exit $status
