#!/usr/bin/env bash
# Follow-up of sst2_avg2bits.md: the same search / QAT recipe in a space WITHOUT pruning ({1,2,4,8} bits),
# to test whether pruned rows are what costs the searched plan its QAT recovery.
set -euo pipefail
G=${GLUE_DIR:-../shared/data/glue}
T=runs/sst2_fp32
R=experiments/results
export NASQ_NO_PROGRESS=1
COMMON="--task sst2 --data-dir $G"
[ -f runs/sst2_search_avg2_nopruning/run.json ] && grep -q '"done"' runs/sst2_search_avg2_nopruning/run.json || \
  nasq search --teacher $T $COMMON --train-subset 8000 --avg-bits 2 --space aqbert_128g_nopruning --max-steps 300 \
    --set train.lr=2e-5 --set train.log_every=10 --set train.checkpoint_every=100 --set data.heldout=0.2 \
    --out runs/sst2_search_avg2_nopruning --overwrite
[ -f runs/plans/nasq_avg2_nopruning.json ] || nasq finalize runs/sst2_search_avg2_nopruning --out runs/plans/nasq_avg2_nopruning.json
m=nasq_avg2_nopruning
nasq finetune --plan runs/plans/$m.json --teacher $T $COMMON --train-subset 20000 --max-steps 400 \
  --set train.log_every=50 --set train.checkpoint_every=200 --out runs/qat_$m --overwrite
nasq export runs/qat_$m --out runs/qat_$m.nasq --overwrite
nasq eval runs/qat_$m --artifact runs/qat_$m.nasq $COMMON > $R/sst2_eval_$m.json
