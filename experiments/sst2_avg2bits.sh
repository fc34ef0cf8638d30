#!/usr/bin/env bash
# MiniLM-L6 / SST-2 at an average of 2 bits on the searched encoder weights (aqbert_128g space):
# nasq search vs uniform 2-bit vs Hessian-sensitivity, same QAT+KD recipe, same budget.
# Prerequisite: the fp32 teacher  runs/sst2_fp32  (nasq finetune --model minilm-l6 --task sst2 --data-dir G --out runs/sst2_fp32)
# Usage: bash experiments/sst2_avg2bits.sh   (from the repo root; each stage is skipped when its output exists)
set -euo pipefail
G=${GLUE_DIR:-../shared/data/glue}
T=runs/sst2_fp32
R=experiments/results
mkdir -p runs/plans $R
export NASQ_NO_PROGRESS=1
COMMON="--task sst2 --data-dir $G"
QAT_STEPS=${QAT_STEPS:-400}
SEARCH_STEPS=${SEARCH_STEPS:-300}

[ -f runs/sst2_search_avg2/run.json ] && grep -q '"done"' runs/sst2_search_avg2/run.json || \
  nasq search --teacher $T $COMMON --train-subset 8000 --avg-bits 2 --space aqbert_128g --max-steps $SEARCH_STEPS \
    --set train.lr=2e-5 --set train.log_every=10 --set train.checkpoint_every=100 --set data.heldout=0.2 \
    --out runs/sst2_search_avg2 --overwrite
[ -f runs/plans/nasq_avg2.json ] || nasq finalize runs/sst2_search_avg2 --out runs/plans/nasq_avg2.json
[ -f runs/plans/uniform2.json ] || nasq baseline uniform --teacher $T $COMMON --space aqbert_128g --bits 2 --out runs/plans/uniform2.json
[ -f runs/plans/hessian_avg2.json ] || nasq baseline hessian --teacher $T $COMMON --space aqbert_128g --avg-bits 2 --out runs/plans/hessian_avg2.json

for m in nasq_avg2 uniform2 hessian_avg2; do
  if ! { [ -f runs/qat_$m/run.json ] && grep -q '"done"' runs/qat_$m/run.json; }; then
    nasq finetune --plan runs/plans/$m.json --teacher $T $COMMON --train-subset 20000 --max-steps $QAT_STEPS \
      --set train.log_every=50 --set train.checkpoint_every=200 --out runs/qat_$m --overwrite
  fi
  [ -f runs/qat_$m.nasq/manifest.json ] || nasq export runs/qat_$m --out runs/qat_$m.nasq --overwrite
  nasq eval runs/qat_$m --artifact runs/qat_$m.nasq $COMMON > $R/sst2_eval_$m.json
done
