#!/usr/bin/env bash
# The prepared check for a session with an NVIDIA Hopper GPU (H100/H200), in one command of
# under 8 minutes: (1) the Mosaic GPU kernel tests on the device (JAXATTN_GPU_HARDWARE=1),
# (2) benchmarks/kernels.py (ours vs cuDNN vs tokamax). Each step has a timeout and a log in
# ${OUT:-/tmp}; a failed step does not stop the next; the exit status is the first failure's.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # beforehand, where PyPI is reachable: the
#                                                 # tokamax peer and what it needs, into .whl/
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (carry .whl there)
#   BENCH_ARGS=--quick bash benchmarks/gpu_check.sh
#
# Nothing is installed from a registry (the GPU machine reaches none) and jax is never
# reinstalled: the repo runs from its root (PYTHONPATH) on the machine's jax and flax, and the
# wheels in .whl/, if any, go to /tmp/site with --no-deps. Without them the tokamax column
# says n/a. Limits in seconds, at most 30 + 150 + 280 = 460 in all: TEST_TIMEOUT=150,
# BENCH_TIMEOUT=280, BENCH_BUDGET=215 (no benchmark row starts after it; the H = 128 rows and
# decode run first, so a cut drops H = 64 and 256: rerun those with
# BENCH_ARGS="--head-dims 64 256 --parts flash").
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp}
# tokamax and those of its requirements that the GPU image (jax 0.11, Python 3.12) lacks.
PEER_WHEELS="tokamax==0.0.12 qwix==0.1.8 einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 typeguard==2.13.3
  immutabledict==4.3.1 tensorboardx==2.6.5"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # shellcheck disable=SC2086  # the list splits into one argument per wheel
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $PEER_WHEELS
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS COMMAND...: run it under a timeout, tee to $OUT/NAME.log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=$rc; fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem \
  --format=csv; $PY -c 'import jax; print(jax.__version__, jax.devices())'"
step gpu_tests "${TEST_TIMEOUT:-150}" env JAXATTN_GPU_HARDWARE=1 "$PY" -m pytest -q -ra \
  -p no:cacheprovider tests/pallas_kernels/flash_attention/test_flash_attention_gpu.py \
  tests/pallas_kernels/decode_attention/test_decode_attention_gpu.py
# shellcheck disable=SC2086  # BENCH_ARGS splits into flags
step kernels "${BENCH_TIMEOUT:-280}" "$PY" -m benchmarks.kernels ${BENCH_ARGS:-} \
  --time-budget "${BENCH_BUDGET:-215}" --json "$OUT/kernels.json" --markdown "$OUT/kernels.md"
echo "== done: exit $status; logs, kernels.json and kernels.md in $OUT"
exit "$status"
