#!/usr/bin/env bash
# The training choices measured on the 3D phantom at one budget: DDM with the paper's loss, with the
# loss on the subtracted field (our default), with and without the EMA of the weights, beside the
# paper's baselines VM and VM-diff; then benchmarks/phantom_ablation.py collects the reports into
# benchmarks/results/phantom_ablation.{json,md}. About 45 minutes on a 2-core CPU.
#
#   bash benchmarks/phantom_ablation.sh [WORK_DIR]          (default: runs/ablation)
#   ITERATIONS=1200 by default; the same seed, data, grid and learning rate for every run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
WORK=${1:-runs/ablation}
ITERATIONS=${ITERATIONS:-1200}
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
ddm4d() { "$PYTHON" -m ddm4d "$@"; }

mkdir -p "$WORK"
[[ -d "$WORK/data" ]] || ddm4d phantom "$WORK/data" --subjects 20 --seed 0 > "$WORK/data.log"
[[ -d "$WORK/eval" ]] || ddm4d phantom "$WORK/eval" --subjects 4 --seed 1 > "$WORK/eval.log"
common=(--iterations "$ITERATIONS" --size 64 64 16 --spacing 3.0 3.0 6.3 --device cpu --seed 0
        --checkpoint-every 400 --progress json --log-every 100)
declare -A extra=([ddm_paper_loss]="--paper-loss --ema 0" [ddm]="--ema 0" [ddm_ema]="--ema 0.999"
                  [vm]="--method vm --ema 0" [vmdiff]="--method vmdiff --ema 0")
for run in ddm_paper_loss ddm ddm_ema vm vmdiff; do
  if [[ ! -f "$WORK/$run/model.safetensors" ]]; then
    # shellcheck disable=SC2086
    ddm4d train "$WORK/data" --out "$WORK/$run" "${common[@]}" ${extra[$run]} > "$WORK/$run.jsonl"
  fi
done
for run in ddm_paper_loss ddm ddm_ema; do
  ddm4d evaluate "$WORK/eval" --model "$WORK/$run/model.safetensors" --methods initial,linear,ddm \
    --device cpu --out "$WORK/report_$run" > "$WORK/report_$run.log"
done
ddm4d evaluate "$WORK/eval" --model "$WORK/ddm/model.safetensors" --vm-model "$WORK/vm/model.safetensors" \
  --vmdiff-model "$WORK/vmdiff/model.safetensors" --device cpu --out "$WORK/report_all" > "$WORK/report_all.log"
"$PYTHON" benchmarks/phantom_ablation.py "$WORK"
