#!/usr/bin/env bash
# Re-create the bundled default models Resources/models/ddm_phantom_{3d,2d}.safetensors and their
# model cards, from nothing but this repository: synthetic training data (`ddm4d phantom`),
# `ddm4d train`, `ddm4d evaluate` on held-out phantom subjects (another seed), then copy + card.
#
# Usage:  bash scripts/train_default_models.sh [3d|2d|all]      (default: all)
#
# Settings (environment variables; defaults in brackets):
#   ITERATIONS          training iterations of both models       [ITERATIONS_3D / ITERATIONS_2D]
#   ITERATIONS_3D       [20000]        ITERATIONS_2D  [20000]
#   DEVICE              auto | cpu | cuda                         [auto]
#   SUBJECTS_3D         phantom training subjects, 3D             [20]
#   SUBJECTS_2D         phantom training subjects, single slice   [100]
#   EVAL_SUBJECTS       held-out phantom subjects for evaluation  [10]
#   TRAIN_SEED / EVAL_SEED  phantom data-set seeds                [0 / 1]  (the demo uses 2026)
#   PHANTOM_SIZE_3D     phantom grid "NX NY NZ"                   [empty: ACDC-like, drawn per subject]
#   PHANTOM_SIZE_2D     phantom grid of the single-slice data     ["160 160 1"]
#   PHANTOM_FRAMES      phantom frames per cycle                  [empty: drawn, 12..25]
#   MODEL_SIZE_3D / MODEL_SPACING_3D / MODEL_SIZE_2D / MODEL_SPACING_2D
#                       model grid (ddm4d train --size/--spacing) [empty: the paper's 128x128x32 at
#                       1.5x1.5x3.15 mm; 2D 128x128 at 1.5x1.5 mm]
#   CHECKPOINT_EVERY    [500]          TRAIN_ARGS  more `ddm4d train` options  []
#   TIME_LIMIT          seconds per training call; at the limit the run checkpoints and stops (exit 3):
#                       run the script again to resume it                              [none]
#   BUNDLE              which weights of the run to ship: model.safetensors | model_best.safetensors
#                                                                                     [model.safetensors]
#   WORK                working folder (data, runs, evaluations)  [runs/default-models]
#   DEST                where the models and cards go             [Resources/models]
#   PYTHON              interpreter                               [.venv/bin/python if present, else python3]
#
# Re-running is safe: the phantom data are kept when their settings did not change, and a training
# run in WORK is resumed from its last checkpoint (--resume) instead of started again.
# Smoke test (minutes on a CPU; writes nowhere near Resources/models):
#   ITERATIONS=4 SUBJECTS_3D=3 SUBJECTS_2D=3 EVAL_SUBJECTS=2 PHANTOM_SIZE_3D="48 48 8" PHANTOM_SIZE_2D="48 48 1" \
#   PHANTOM_FRAMES=8 MODEL_SIZE_3D="32 32 16" MODEL_SPACING_3D="6 6 8" MODEL_SIZE_2D="32 32" MODEL_SPACING_2D="6 6" \
#   CHECKPOINT_EVERY=2 DEVICE=cpu WORK=/tmp/ddm-smoke DEST=/tmp/ddm-smoke/models bash scripts/train_default_models.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's ddm4d, installed or not
export PYTHONUNBUFFERED=1
# waiting OpenMP threads sleep instead of spinning: spinning ones made CPU training many times slower
# on a small machine busy with anything else
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

WHICH=${1:-all}
case "$WHICH" in
  3d) KINDS=(3d) ;;
  2d) KINDS=(2d) ;;
  all) KINDS=(3d 2d) ;;
  -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [3d|2d|all]" >&2; exit 2 ;;
esac

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-auto}
ITERATIONS_3D=${ITERATIONS_3D:-${ITERATIONS:-20000}}
ITERATIONS_2D=${ITERATIONS_2D:-${ITERATIONS:-20000}}
SUBJECTS_3D=${SUBJECTS_3D:-20}
SUBJECTS_2D=${SUBJECTS_2D:-100}
EVAL_SUBJECTS=${EVAL_SUBJECTS:-10}
TRAIN_SEED=${TRAIN_SEED:-0}
EVAL_SEED=${EVAL_SEED:-1}
PHANTOM_SIZE_3D=${PHANTOM_SIZE_3D:-}
PHANTOM_SIZE_2D=${PHANTOM_SIZE_2D:-160 160 1}
PHANTOM_FRAMES=${PHANTOM_FRAMES:-}
MODEL_SIZE_3D=${MODEL_SIZE_3D:-}
MODEL_SPACING_3D=${MODEL_SPACING_3D:-}
MODEL_SIZE_2D=${MODEL_SIZE_2D:-}
MODEL_SPACING_2D=${MODEL_SPACING_2D:-}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500}
TRAIN_ARGS=${TRAIN_ARGS:-}
TIME_LIMIT=${TIME_LIMIT:-}
BUNDLE=${BUNDLE:-model.safetensors}
WORK=${WORK:-runs/default-models}
DEST=${DEST:-Resources/models}

if [[ "$TRAIN_SEED" == "$EVAL_SEED" ]]; then
  echo "error: TRAIN_SEED and EVAL_SEED are both $TRAIN_SEED; the evaluation must use held-out subjects" >&2
  exit 2
fi

log() { echo "== $(date -u +%H:%M:%S) $*"; }
ddm4d() { "$PYTHON" -m ddm4d "$@"; }
# a command line as one copy-pasteable string (quotes only where the shell needs them)
quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="${out:+ }$a"
    elif [[ "$a" =~ ^([A-Z_0-9]+)=([A-Za-z0-9_./:=,+@%\ -]*)$ ]]; then out+="${out:+ }${BASH_REMATCH[1]}=\"${BASH_REMATCH[2]}\""
    else out+="${out:+ }$(printf '%q' "$a")"; fi
  done
  echo "$out"
}

log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
log "device: $("$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch
from ddm4d.device import resolve_device
d = resolve_device(sys.argv[1])
print(f"{d} ({torch.cuda.get_device_name(d) if d.type == 'cuda' else 'CPU'}), torch {torch.__version__}")
EOF
)"

# phantom DIR SEED N SIZE: write a phantom data set unless DIR already holds exactly that one
phantom() {
  local dir=$1 seed=$2 n=$3 size=$4
  local args=(--subjects "$n" --seed "$seed")
  [[ -n "$size" ]] && args+=(--size $size)
  [[ -n "$PHANTOM_FRAMES" ]] && args+=(--frames "$PHANTOM_FRAMES")
  local stamp="$dir/.phantom-args"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "${args[*]}" ]]; then
    log "phantom data $dir: kept (${args[*]})"
  else
    rm -rf "$dir"
    log "phantom data $dir: ddm4d phantom ${args[*]}"
    ddm4d phantom "$dir" "${args[@]}" > "$dir.log"
    echo "${args[*]}" > "$stamp"
  fi
  PHANTOM_COMMAND="ddm4d phantom DATA_DIR ${args[*]}"
}

# the card names the folders DATA, EVAL, RUN and REPORT, not this machine's paths
card_paths() {
  local text=$1
  text=${text//"$run"/RUN}; text=${text//"$eval_data"/EVAL}; text=${text//"$data"/DATA}; text=${text//"$report"/REPORT}
  echo "${text// --progress bar/}"
}

train_one() {
  local kind=$1
  local dims=${kind%d} iterations size spacing phantom_size subjects
  if [[ $kind == 3d ]]; then
    iterations=$ITERATIONS_3D; size=$MODEL_SIZE_3D; spacing=$MODEL_SPACING_3D
    phantom_size=$PHANTOM_SIZE_3D; subjects=$SUBJECTS_3D
  else
    iterations=$ITERATIONS_2D; size=$MODEL_SIZE_2D; spacing=$MODEL_SPACING_2D
    phantom_size=$PHANTOM_SIZE_2D; subjects=$SUBJECTS_2D
    if [[ -z "$phantom_size" || "${phantom_size##* }" != 1 ]]; then
      echo "error: PHANTOM_SIZE_2D must be \"NX NY 1\" (a single slice), got \"$phantom_size\"" >&2; exit 2
    fi
  fi
  local data="$WORK/data_$kind" eval_data="$WORK/eval_data_$kind" run="$WORK/run_$kind" report="$WORK/evaluation_$kind"
  local name="ddm_phantom_$kind"
  mkdir -p "$WORK"

  # 1. data: training set and held-out evaluation set (another seed)
  phantom "$data" "$TRAIN_SEED" "$subjects" "$phantom_size"
  local train_data_command=$PHANTOM_COMMAND
  phantom "$eval_data" "$EVAL_SEED" "$EVAL_SUBJECTS" "$phantom_size"
  local eval_data_command=$PHANTOM_COMMAND

  # 2. training (resumed when the run folder already has checkpoints)
  local targs=(--iterations "$iterations" --device "$DEVICE" --seed 0 --spatial-dims "$dims"
               --checkpoint-every "$CHECKPOINT_EVERY" --progress bar)
  [[ -n "$size" ]] && targs+=(--size $size)
  [[ -n "$spacing" ]] && targs+=(--spacing $spacing)
  # shellcheck disable=SC2206
  [[ -n "$TRAIN_ARGS" ]] && targs+=($TRAIN_ARGS)
  local resume=()
  if compgen -G "$run/checkpoints/*.safetensors" > /dev/null; then
    resume=(--resume); log "training $kind: resuming $run"
  else
    log "training $kind: $iterations iterations into $run"
  fi
  local train_cmd=(ddm4d train "$data" --out "$run" "${targs[@]}" "${resume[@]}")
  local code=0
  if [[ -n "$TIME_LIMIT" ]]; then
    timeout --signal=TERM --kill-after=300 "$TIME_LIMIT" "$PYTHON" -m "${train_cmd[@]}" || code=$?
  else
    "$PYTHON" -m "${train_cmd[@]}" || code=$?
  fi
  if [[ $code == 124 || $code == 130 || $code == 143 ]]; then
    log "training $kind stopped (exit $code) with its checkpoint saved; run this script again to resume it"
    exit 3
  elif [[ $code != 0 ]]; then
    echo "error: ddm4d train failed for $kind (exit $code)" >&2; exit "$code"
  fi
  [[ -f "$run/$BUNDLE" ]] || { echo "error: $run/$BUNDLE is missing after training" >&2; exit 1; }

  # 3. evaluation on the held-out subjects
  log "evaluating $kind on $eval_data"
  local eval_cmd=(ddm4d evaluate "$eval_data" --model "$run/$BUNDLE" --out "$report"
                  --methods initial,linear,ddm --device "$DEVICE")
  "$PYTHON" -m "${eval_cmd[@]}"

  # 4. the bundled model and its card
  mkdir -p "$DEST"
  cp "$run/$BUNDLE" "$DEST/.$name.safetensors.tmp"
  chmod 644 "$DEST/.$name.safetensors.tmp"
  mv -f "$DEST/.$name.safetensors.tmp" "$DEST/$name.safetensors"
  local upper settings=() reproduce
  upper=$(echo "$kind" | tr '[:lower:]' '[:upper:]')
  settings+=("ITERATIONS_$upper=$iterations" "SUBJECTS_$upper=$subjects" "EVAL_SUBJECTS=$EVAL_SUBJECTS"
             "TRAIN_SEED=$TRAIN_SEED" "EVAL_SEED=$EVAL_SEED" "DEVICE=$DEVICE")
  [[ -n "$phantom_size" ]] && settings+=("PHANTOM_SIZE_$upper=$phantom_size")
  [[ -n "$PHANTOM_FRAMES" ]] && settings+=("PHANTOM_FRAMES=$PHANTOM_FRAMES")
  [[ -n "$size" ]] && settings+=("MODEL_SIZE_$upper=$size")
  [[ -n "$spacing" ]] && settings+=("MODEL_SPACING_$upper=$spacing")
  [[ -n "$TRAIN_ARGS" ]] && settings+=("TRAIN_ARGS=$TRAIN_ARGS")
  [[ "$BUNDLE" != model.safetensors ]] && settings+=("BUNDLE=$BUNDLE")
  reproduce="$(quote "${settings[@]}") bash scripts/train_default_models.sh $kind"
  "$PYTHON" scripts/model_card.py --run "$run" --evaluation "$report" --model "$DEST/$name.safetensors" \
    --out "$DEST/$name.md" \
    --train-data-command "${train_data_command/DATA_DIR/DATA}" \
    --eval-data-command "${eval_data_command/DATA_DIR/EVAL}" \
    --train-command "$(card_paths "$(quote "${train_cmd[@]:0:${#train_cmd[@]}-${#resume[@]}}")")" \
    --eval-command "$(card_paths "$(quote "${eval_cmd[@]}")")" \
    --reproduce "$reproduce"
  log "$kind done: $DEST/$name.safetensors, $DEST/$name.md (evaluation: $report/table1.md)"
}

start=$(date +%s)
for kind in "${KINDS[@]}"; do
  train_one "$kind"
done
log "all done in $(( $(date +%s) - start )) s"
