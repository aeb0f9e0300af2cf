#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the test suite. `.ci/run` calls exactly this.
#
# By default the CUDA kernels must compile (FEDSPA_BUILD_CUDA=1) and the cpp, CUDA-build and triton backends
# must be present (FEDSPA_REQUIRE_BACKENDS); on a machine without a CUDA toolkit run
#   FEDSPA_BUILD_CUDA=auto FEDSPA_REQUIRE_BACKENDS=cpp,triton scripts/test.sh
# Triton runs on its CPU interpreter when there is no GPU (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."

export FEDSPA_BUILD_CUDA=${FEDSPA_BUILD_CUDA:-1}
export FEDSPA_REQUIRE_BACKENDS=${FEDSPA_REQUIRE_BACKENDS:-cpp,cuda-build,triton}
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

status=0
python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
