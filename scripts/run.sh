#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the main job: the default FedSpa experiment on the CPU
# (configs/default.yaml: Fashion-MNIST, 10 non-IID clients, a small CNN at the paper's density 0.5 with 5 local
# epochs, 20 rounds), compared with the same algorithm on dense weights x mask and with dense FedAvg. Prints the
# table (accuracy, bytes, FLOPs, peak memory, time); everything else lands in runs/default_compare/.
#
#   extra arguments go to `fedspa compare`, e.g.  scripts/run.sh --seeds 0,1,2 rounds=50
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

dataset_args=()
if ! python -c 'from fedspa.data import load_idx; load_idx("fashion_mnist", None)' 2>/dev/null; then
  echo "!! Fashion-MNIST not found (Debian package dataset-fashion-mnist, or FEDSPA_DATA): using scikit-learn's" \
       "digits instead" >&2
  dataset_args=(data.dataset=digits data.samples_per_client=150)
fi
fedspa compare --config configs/default.yaml --output runs/default_compare "$@" ${dataset_args[@]+"${dataset_args[@]}"}
