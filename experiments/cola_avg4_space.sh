#!/usr/bin/env bash
# usage: experiments/cola_avg4_space.sh SPACE     (e.g. aqbert_128g_nopruning, per_matrix)
# Investigation of the CoLA / avg-4-bit grid cells (grid_notes.md): every plan that prunes rows (nasq 16%,
# random 15%, Hessian 37%) ends near MCC 0 while uniform 4-bit keeps 0.284. Same recipe as the grid's CoLA nasq
# cell (150 search steps on all train rows, 20% held out; 200 QAT steps, seed 0) in another search space:
# aqbert_128g_nopruning ({1,2,4,8}: are pruned rows what breaks CoLA?) or per_matrix ({2,4,8}, one gate per
# matrix: does a coarser space give each gate enough signal?).
set -euo pipefail
S=${1:?usage: $0 SPACE}
G=${GLUE_DIR:-../shared/data/glue}
T=runs/grid/cola/fp32
O=runs/investigate/cola_avg4_$S
R=experiments/results
export NASQ_NO_PROGRESS=1
COMMON="--task cola --data-dir $G --seed 0"
mkdir -p $O
[ -f $O/search/run.json ] && grep -q '"done"' $O/search/run.json || \
  nasq search --teacher $T $COMMON --avg-bits 4 --space $S --max-steps 150 \
    --set train.lr=2e-5 --set data.heldout=0.2 --set train.log_every=10 --set train.checkpoint_every=100 \
    --out $O/search --overwrite
[ -f $O/plan.json ] || nasq finalize $O/search --out $O/plan.json
nasq finetune --plan $O/plan.json --teacher $T $COMMON --max-steps 200 --set train.lr=5e-5 \
  --set train.log_every=50 --set train.checkpoint_every=200 --out $O/qat --overwrite
nasq export $O/qat --out $O/model.nasq --overwrite
nasq eval $O/qat --artifact $O/model.nasq $COMMON > $R/cola_avg4_${S}_eval.json
cp $O/plan.json $R/cola_avg4_${S}_plan.json
