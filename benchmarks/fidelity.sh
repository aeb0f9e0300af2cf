#!/usr/bin/env bash
# FedSpa's claim, tested fairly: the runs behind benchmarks/results/fidelity_<date>/ (see benchmarks/README.md).
# Every stage is one `fedspa compare` on configs/default.yaml (every method at the same settings), 3 seeds; its
# runs land in $FEDSPA_FIDELITY_RUNS/<stage>/ (an interrupted stage resumes), and the tables, plots and each run's
# config.yaml / metrics.jsonl / summary.json are copied to benchmarks/results/fidelity_<date>/<stage>/.
#
#   benchmarks/fidelity.sh [stage ...] [-- extra compare arguments, e.g. threads=1]
#   FEDSPA_FIDELITY_RUNS (default runs/fidelity), FEDSPA_FIDELITY_RESULTS (default benchmarks/results/fidelity_<date>)
#   FEDSPA_FIDELITY_JOBS (default 1): a stage's variants split over this many `fedspa compare` processes at once
#     (each at threads=1), then one more that finds every run done and writes the stage's table
#
# stages (default: all, in this order):
#   validation    FedSpa's options on a validation split carved from the clients' training data (the test split is
#                 not read): regrowth random vs |gradient| x regrown weights at 0 vs the global value, and holders
#                 vs mean aggregation at either regrowth (18 runs). The defaults in configs/default.yaml were chosen
#                 from this table.
#   ablations     FedSpa at its defaults vs one mask shared by all clients (the defaults' random regrowth is what
#                 a shared mask needs), and vs a personal dense head (9 runs)
#   dirichlet     every algorithm (FedDST included) and the dense-masked twins of the sparse ones, Dirichlet(0.3)
#                 labels (42 runs)
#   pathological  2 classes per client: every algorithm (33 runs; the dense-masked twins are in dirichlet and
#                 density)
#   density       FedSpa and its dense-masked twin at density 0.5, 0.2 and 0.1 (18 runs)
set -euo pipefail
cd "$(dirname "$0")/.."

stages=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    validation|ablations|dirichlet|pathological|density) stages+=("$1"); shift ;;
    *) echo "fidelity.sh: unknown stage $1 (validation, ablations, dirichlet, pathological, density)" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || stages=(validation ablations dirichlet pathological density)
runs=${FEDSPA_FIDELITY_RUNS:-runs/fidelity}
results=${FEDSPA_FIDELITY_RESULTS:-benchmarks/results/fidelity_$(date -u +%Y-%m-%d)}

jobs=${FEDSPA_FIDELITY_JOBS:-1}

run_stage() {  # stage, variants, then config overrides
  local stage=$1 variants=$2
  shift 2
  if [ "$jobs" -gt 1 ]; then  # disjoint groups of variants at once (their runs are separate folders)
    local groups pids=() group
    groups=$(python -c 'import sys
from fedspa.compare import expand_variants
variants, jobs = expand_variants(sys.argv[1].split(",")), int(sys.argv[2])
print("\n".join(",".join(variants[i::jobs]) for i in range(jobs) if variants[i::jobs]))' "$variants" "$jobs")
    mkdir -p "$runs"
    while IFS= read -r group; do
      fedspa compare --config configs/default.yaml --output "$runs/$stage" --variants "$group" \
        --seeds 0,1,2 progress=false "$@" ${extra[@]+"${extra[@]}"} threads=1 > "$runs/$stage.${#pids[@]}.log" 2>&1 &
      pids+=($!)
    done <<< "$groups"
    for pid in "${pids[@]}"; do wait "$pid"; done
  fi
  fedspa compare --config configs/default.yaml --output "$runs/$stage" --variants "$variants" \
    --seeds 0,1,2 progress=false "$@" ${extra[@]+"${extra[@]}"}
  python - "$runs/$stage" "$results/$stage" <<'EOF'
import shutil, sys
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
target.mkdir(parents=True, exist_ok=True)
for f in source.glob("comparison.*"):
    shutil.copy2(f, target / f.name)
for f in source.glob("*.png"):
    shutil.copy2(f, target / f.name)
for run in sorted(p for p in source.iterdir() if p.is_dir()):
    (target / run.name).mkdir(exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy2(run / name, target / run.name / name)
print(f"copied {source} -> {target}")
EOF
}

for stage in "${stages[@]}"; do
  case "$stage" in
    validation)
      run_stage validation "fedspa+fedspa.regrowth=random+fedspa.regrown_init=zero,\
fedspa+fedspa.regrowth=random+fedspa.regrown_init=global,\
fedspa+fedspa.regrowth=gradient+fedspa.regrown_init=zero,fedspa+fedspa.regrowth=gradient+fedspa.regrown_init=global,\
fedspa+fedspa.regrowth=random+fedspa.regrown_init=zero+fedspa.aggregation=mean,\
fedspa+fedspa.regrowth=gradient+fedspa.regrown_init=zero+fedspa.aggregation=mean" data.evaluate_on=validation ;;
    ablations)
      run_stage ablations "fedspa,fedspa+fedspa.mask_scope=shared,fedspa+fedspa.personal_head=true" ;;
    dirichlet)
      run_stage dirichlet all ;;
    pathological)
      run_stage pathological fedspa,ditto,sub_fedavg,local,fedrep,fedper,feddst,fedavg,fedavg_ft,lg_fedavg,fedprox \
        data.partition=pathological data.classes_per_client=2 ;;
    density)  # FedSpa and the same algorithm on dense weights x mask at each density: what sparsity buys
      run_stage density "fedspa+fedspa.density=0.5,fedspa:dense_masked+fedspa.density=0.5,\
fedspa+fedspa.density=0.2,fedspa:dense_masked+fedspa.density=0.2,\
fedspa+fedspa.density=0.1,fedspa:dense_masked+fedspa.density=0.1" ;;
  esac
done
