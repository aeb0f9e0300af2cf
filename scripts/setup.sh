#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv, pinned torch and tools, and the
# package built in place (C++ CPU kernels, plus the CUDA kernels when a CUDA toolkit is found).
#
#   FEDSPA_BUILD_CUDA=auto|0|1   (default auto; the test command uses 1 so a CUDA build error fails)
#   CUDA_HOME                    (default /usr/local/cuda when it exists)
#   PYTHON                       (default python3)
#   --peers                      also install the benchmarks' peers (requirements/peers.txt: SparseProp, a
#                                C++ source build)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=0
for arg in "$@"; do
  case "$arg" in
    --peers) PEERS=1 ;;
    *) echo "setup.sh: unknown argument $arg (known: --peers)" >&2; exit 2 ;;
  esac
done

# The default experiment's dataset, Fashion-MNIST, comes from Debian (no download): install it when we can.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "== installing dataset-fashion-mnist (apt)"
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "!! could not install dataset-fashion-mnist; the main job falls back to scikit-learn's digits" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== installing pinned dependencies (requirements/dev.txt)"
python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
if [ "$PEERS" = 1 ]; then
  echo "== installing the benchmarks' peers (requirements/peers.txt)"
  grep -v '^sparseprop' requirements/peers.txt | python -m pip install --quiet --disable-pip-version-check -r /dev/stdin
  # its setup.py imports pybind11 from the environment: no build isolation
  python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps \
    "$(grep '^sparseprop' requirements/peers.txt)"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "== building fedspa (FEDSPA_BUILD_CUDA=${FEDSPA_BUILD_CUDA:-auto}, CUDA_HOME=${CUDA_HOME:-unset})"
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -m fedspa_kernels
