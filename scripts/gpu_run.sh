#!/usr/bin/env bash
# One call on the GPU machine (no network): install the carried wheels, build pydpm with its CUDA kernels,
# run the whole test suite (GPU tests included) and the benchmark suite, write everything under $1
# (default $OUT), and print a short table last.
#   local:  pip download the wheels into .whl/ (see README, "Benchmarks on a GPU machine")
#   remote: PYDPM_BENCH_COMMIT=<local git rev-parse --short HEAD> bash scripts/gpu_run.sh "$OUT" [options]
#           (the copy of the tree sent there carries a stale .git: name the commit benchmarked)
#   options: --no-bench | --bench "ARGS" (pydpm bench arguments, default: the whole suite)
#            --tests "ARGS" (pytest arguments, default: tests; "-n 8" runs 8 workers: pytest-xdist is carried)
#            --tune "ARGS" (the attention launch-configuration sweep, bench/attention_tune.py, with ARGS)
set -uo pipefail
out="${1:-${OUT:?give an output folder}}"
shift || true
bench=1 bench_args="" test_args="tests" tune=0 tune_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) bench=0 ;;
    --bench) bench_args="$2"; shift ;;
    --tests) test_args="$2"; shift ;;
    --tune) tune=1; tune_args="$2"; shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"

export PYDPM_CUDA=on PYDPM_CUDA_ARCHS="${PYDPM_CUDA_ARCHS:-90}" CMAKE_BUILD_PARALLEL_LEVEL=16
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
grep -E "ptxas info|registers|spill" "$out/build.log" | sort -u | head -40 >"$out/ptxas.txt"
python3 -m pydpm info | tee "$out/info.txt"

# shellcheck disable=SC2086
python3 -m pytest -q -p no:cacheprovider -x -rs $test_args >"$out/tests.log" 2>&1
tests_rc=$?
tail -15 "$out/tests.log"

# from outside the checkout below: a source tree on sys.path would shadow the installed package
tune_rc=0
if [ "$tune" = 1 ]; then
  # shellcheck disable=SC2086
  (cd "$out" && python3 -m pydpm.bench.attention_tune --out "$out" $tune_args) >"$out/tune.log" 2>&1
  tune_rc=$?
  tail -45 "$out/tune.log"
fi
bench_rc=0
if [ "$bench" = 1 ]; then
  # shellcheck disable=SC2086
  (cd "$out" && python3 -m pydpm bench --out "$out/bench" $bench_args) >"$out/bench.log" 2>&1
  bench_rc=$?
  tail -60 "$out/bench.log"
fi
echo "tests rc=$tests_rc tune rc=$tune_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || tune_rc != 0 || bench_rc != 0 ))
