#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UBSan: builds pydpm (CPU kernels only, PYDPM_SANITIZE=ON) into a
# fresh virtualenv and runs the tests that reach pydpm._C's CPU kernel (the cpu backend of solver_step and the
# samplers on it) with the sanitizer runtimes preloaded. Exits non-zero on any sanitizer report or test failure.
#   bash scripts/sanitize_cpu.sh [pytest args]     (default: tests/test_solver_step.py tests/test_contract.py -k cpu)
# libstdc++ is preloaded beside libasan: without it a C++ exception thrown inside torch aborts in ASan's
# interceptor. Leak detection is off (the Python interpreter's own allocations at exit are not ours).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0 pytest hypothesis numpy
PYDPM_CUDA=off CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" python -m pip install -q --no-deps \
  -C cmake.define.PYDPM_SANITIZE=ON -C build-dir="$work/build" "$repo"
grep -rqs "fsanitize=address" "$work/build" || { echo "the build did not enable the sanitizers"; exit 1; }
if [ $# -eq 0 ]; then
  set -- "$repo/tests/test_solver_step.py" "$repo/tests/test_contract.py" -k "cpu"
fi
cd "$work"  # outside the checkout: the installed package, not the source tree
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:print_summary=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  python -m pytest -q -p no:cacheprovider "$@"
