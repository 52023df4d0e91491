#!/usr/bin/env bash
# One call on the GPU machine (no network): install the carried wheels, build pydpm with its CUDA kernels, then
# run the phases asked for, each under its own time limit; everything lands in $1/run.tar.gz (default $OUT:
# the device tool returns few files, so one archive) beside summary.txt, the short summary printed last.
#   local:  the packages the GPU machine lacks, as Python 3.12 wheels in .whl/ (git-ignored: carry it with the
#           run, or the tests that need the test extras fail there), e.g.
#           pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#             diffusers==0.42.1 PyWavelets==1.9.0 ptwt==1.0.1 pytorch-wavelets==1.3.0 focal-frequency-loss==0.3.0
#   remote: PYDPM_BENCH_COMMIT=<local git rev-parse --short HEAD> bash scripts/gpu_run.sh "$OUT" [phases]
#           (the copy of the tree sent there carries a stale .git: name the commit benchmarked)
#   phases (in this order; default: --tests tests --huge --host-cost "" --bench ""):
#     --tests "ARGS"      pytest ARGS as shell words (quote a -k expression inside), GPU tests included, every Triton
#                         launch checked against Triton's own dispatch (PYDPM_VERIFY_LAUNCHES=1); with "-n N"
#                         (N workers) each worker gets one CPU thread and one inductor compile thread
#     --huge              tests/test_huge.py alone (PYDPM_HUGE_TESTS=1): tensors past 2³¹ elements, ~40 GB
#     --sanitize "ARGS"   pytest ARGS under compute-sanitizer: memcheck, racecheck, synccheck (every process, the torch
#                         caching allocator off so that each tensor is its own allocation), error counts in the summary;
#                         with the allocator off, a CUDA-graph capture fails where anything allocates during it (the
#                         model's own temporaries): deselect the graph tests there (-k "not graph")
#     --host-cost "ARGS"  python -m pydpm.bench.host_cost ARGS: the host time of one eager call, op by op
#     --profile "ARGS"    python -m pydpm.bench.device_profile ARGS: a diffusers model's device time by kernel kind
#     --bench "ARGS"      pydpm bench ARGS (repeatable: one run per --bench, results in bench-1/, bench-2/, ...)
#     --tune "ARGS"       the attention launch-configuration sweep, bench/attention_tune.py, with ARGS
#     --demo "ARGS"       examples/spectral_distillation.py ARGS, non-empty (e.g. "--device cuda"): a teacher, three
#                         students, samples, the metric and the table, under $1/demo (checkpoints left out of the archive)
#     --accuracy "ARGS"   bench/tune_accuracy.py --device cuda ARGS (repeatable; last, after the timed phases: the runs
#                         go at once, one process each, results in accuracy-1.md, accuracy-2.md, ...)
#   limits: PYDPM_TEST_TIMEOUT (default 420 s), PYDPM_HUGE_TIMEOUT (300 s), PYDPM_SANITIZE_TIMEOUT (240 s per
#           tool), PYDPM_PROFILE_TIMEOUT (300 s), PYDPM_BENCH_TIMEOUT (540 s per bench run), PYDPM_DEMO_TIMEOUT (540 s),
#           PYDPM_ACCURACY_TIMEOUT (540 s for all the accuracy runs together)
set -uo pipefail
out="${1:-${OUT:?give an output folder}}"
shift || true
tests="" huge=0 sanitize="" host_cost=0 host_args="" profile=0 profile_args="" tune="" demo="" benches=() accuracy=()
explicit=0
while [ $# -gt 0 ]; do
  explicit=1
  case "$1" in
    --tests) tests="$2"; shift ;;
    --huge) huge=1 ;;
    --sanitize) sanitize="$2"; shift ;;
    --host-cost) host_cost=1; host_args="$2"; shift ;;
    --profile) profile=1; profile_args="$2"; shift ;;
    --bench) benches+=("$2"); shift ;;
    --tune) tune="$2"; shift ;;
    --demo) demo="$2"; shift ;;
    --accuracy) accuracy+=("$2"); shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
if [ "$explicit" = 0 ]; then tests="tests"; huge=1; host_cost=1; benches=(""); fi
final="$out"
out=/tmp/gpu-run
rm -rf "$out"
mkdir -p "$out" "$final"
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
python3 -m pydpm info >"$out/info.txt" 2>&1

summary=()
rc=0
if [ -n "$tests" ]; then
  start=$(date +%s)
  eval "args=($tests)"  # shell words: --tests "tests -k 'cuda and not compile'" keeps the -k expression whole
  threads=()
  case " $tests " in *" -n "*) threads=(OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1) ;; esac
  env "${threads[@]}" PYDPM_VERIFY_LAUNCHES=1 timeout "${PYDPM_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -rs "${args[@]}" \
    >"$out/tests.log" 2>&1
  t_rc=$?
  pkill -9 -f "pytest|execnet" 2>/dev/null  # workers a timeout orphaned would load the host the benchmarks time
  sleep 2
  tail -25 "$out/tests.log"
  # the count line, not the last line: -q given twice (ARGS with -q) ends the log with the skip reasons
  summary+=("tests (rc $t_rc, $(( $(date +%s) - start )) s): $(grep -E "passed|failed|error" "$out/tests.log" | tail -1)")
  rc=$(( rc || t_rc ))
fi
if [ "$huge" = 1 ]; then
  start=$(date +%s)
  PYDPM_HUGE_TESTS=1 timeout "${PYDPM_HUGE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_huge.py >"$out/huge.log" 2>&1
  g_rc=$?
  tail -5 "$out/huge.log"
  summary+=("huge tensors (rc $g_rc, $(( $(date +%s) - start )) s): $(tail -1 "$out/huge.log")")
  rc=$(( rc || g_rc ))
fi
if [ -n "$sanitize" ]; then
  eval "args=($sanitize)"
  for tool in memcheck racecheck synccheck; do
    start=$(date +%s)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${PYDPM_SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "$tool" \
      --target-processes all --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider "${args[@]}" \
      >"$out/sanitize-$tool.log" 2>&1
    s_rc=$?
    # memcheck/synccheck end each process with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: N hazards"
    errors=$(grep -oE "(ERROR|RACECHECK) SUMMARY: [0-9]+" "$out/sanitize-$tool.log" | awk '{n += $3} END {print n + 0}')
    processes=$(grep -cE "(ERROR|RACECHECK) SUMMARY" "$out/sanitize-$tool.log")
    summary+=("compute-sanitizer $tool (rc $s_rc, $(( $(date +%s) - start )) s): $errors errors/hazards in $processes \
processes; pytest: $(grep -E "passed|failed" "$out/sanitize-$tool.log" | tail -1)")
    rc=$(( rc || s_rc ))
  done
fi
# From outside the checkout below: a source tree on sys.path would shadow the installed package.
if [ "$host_cost" = 1 ]; then
  # shellcheck disable=SC2086
  (cd "$out" && timeout 240 python3 -m pydpm.bench.host_cost --out "$out/host_cost.json" $host_args) \
    >"$out/host_cost.log" 2>&1
  h_rc=$?
  summary+=("host cost (rc $h_rc):" "$(cat "$out/host_cost.log")")
  rc=$(( rc || h_rc ))
fi
if [ "$profile" = 1 ]; then
  # shellcheck disable=SC2086
  (cd "$out" && timeout "${PYDPM_PROFILE_TIMEOUT:-300}" python3 -m pydpm.bench.device_profile $profile_args) >"$out/profile.log" 2>&1
  p_rc=$?
  summary+=("device profile (rc $p_rc):" "$(grep -v -i warn "$out/profile.log" | grep -E "^[a-z].*: device|^  [a-z]+ [0-9]|^  host:|step at batch|per forward")")
  rc=$(( rc || p_rc ))
fi
if [ -n "$tune" ]; then
  # shellcheck disable=SC2086
  (cd "$out" && timeout 540 python3 -m pydpm.bench.attention_tune --out "$out" $tune) >"$out/tune.log" 2>&1
  u_rc=$?
  summary+=("tune (rc $u_rc): $(tail -45 "$out/tune.log")")
  rc=$(( rc || u_rc ))
fi
if [ -n "$demo" ]; then
  eval "args=($demo)"
  repo=$(pwd)
  (cd "$out" && timeout "${PYDPM_DEMO_TIMEOUT:-540}" python3 "$repo/examples/spectral_distillation.py" --out "$out/demo" \
    "${args[@]}") >"$out/demo.log" 2>&1
  d_rc=$?
  summary+=("demo (rc $d_rc):" "$(tail -8 "$out/demo.log")")
  rc=$(( rc || d_rc ))
fi
i=0
for args in "${benches[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  (cd "$out" && timeout "${PYDPM_BENCH_TIMEOUT:-540}" python3 -m pydpm bench --out "$out/bench-$i" $args) \
    >"$out/bench-$i.log" 2>&1
  b_rc=$?
  summary+=("bench $i [$args] (rc $b_rc):" "$(sed -n '/^targets/,/^results/p' "$out/bench-$i.log")")
  rc=$(( rc || b_rc ))
done
i=0
for args in "${accuracy[@]}"; do
  i=$((i + 1))
  eval "words=($args)"
  OMP_NUM_THREADS=1 timeout "${PYDPM_ACCURACY_TIMEOUT:-540}" python3 bench/tune_accuracy.py --device cuda "${words[@]}" \
    >"$out/accuracy-$i.md" 2>"$out/accuracy-$i.log" &
done
for i in $(seq 1 ${#accuracy[@]}); do
  wait -n
  a_rc=$?
  rc=$(( rc || a_rc ))
done
i=0
for args in "${accuracy[@]}"; do
  i=$((i + 1))
  summary+=("accuracy $i [$args]:" "$(grep -E '^\| [a-z]|^\(' "$out/accuracy-$i.md")" "$(tail -3 "$out/accuracy-$i.log")")
done
printf '%s\n' "----- summary -----" "${summary[@]}" | tee "$final/summary.txt"
tar czf "$final/run.tar.gz" --exclude="*.pt" -C /tmp gpu-run  # no checkpoints: the device tool returns small files
exit "$rc"
