#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the main job: for now the CPU kernel benchmark of sparse
# scatter-add aggregation against index_add_, written to benchmarks/results/ and printed as a table.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

mkdir -p runs
stamp=$(date -u +%Y-%m-%d)
python -m pytest benchmarks/test_cpu_scatter_add.py -q -p no:cacheprovider \
  --benchmark-json=runs/cpu_scatter_add_raw.json --benchmark-columns=median,min,rounds
versions=$(python -c 'import json, torch, fedspa_kernels as fk; i = fk.system_info(); print(json.dumps({"torch": i["torch"], "triton": i["triton"], "fedspa": i["fedspa"], "threads": i["cpu_threads"]}))')
python benchmarks/report.py runs/cpu_scatter_add_raw.json --versions "$versions" \
  --out "runs/cpu_scatter_add_${stamp}.json" --markdown "runs/cpu_scatter_add_${stamp}.md"
echo "results: runs/cpu_scatter_add_${stamp}.json (copy to benchmarks/results/ to publish)"
