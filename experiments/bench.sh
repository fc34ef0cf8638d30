#!/usr/bin/env bash
# Timing ratios on this machine (medians, variants interleaved in one process). Appends JSON lines to
# experiments/results/bench.jsonl. Needs the artifact of experiments/sst2_avg2bits.sh.
set -euo pipefail
OUT=experiments/results/bench.jsonl
A=${ARTIFACT:-runs/qat_nasq_avg2.nasq}
R=${RUN:-runs/qat_nasq_avg2}
export NASQ_NO_PROGRESS=1
nasq bench train-step --model minilm-l6 --batch-size 32 --seq-len 64 --repeats 10 --out $OUT
nasq bench search-step --model minilm-l6 --avg-bits 2 --space aqbert_128g --batch-size 32 --seq-len 64 --repeats 10 --out $OUT
nasq bench infer --artifact $A --teacher $R --batch-size 1 --seq-len 128 --repeats 20 --out $OUT
nasq bench infer --artifact $A --teacher $R --batch-size 32 --seq-len 128 --repeats 5 --out $OUT
python experiments/bench_vs_torch.py $A $R --batch 1 --seq 128 --repeats 20 | tee -a $OUT
python experiments/bench_vs_torch.py $A $R --batch 32 --seq 128 --repeats 5 | tee -a $OUT
