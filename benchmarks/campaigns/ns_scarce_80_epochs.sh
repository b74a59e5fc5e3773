#!/usr/bin/env bash
# the arms at 8 labelled + 48 unlabelled with 80 epochs (the base's n8 plateau: best epoch 60 of 80)
cd "$(dirname "$0")/../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled
R=benchmarks/results/experiments_ns_scarce.jsonl
E=(--override=--trainer.max_epochs=80 --results $R --train-samples 8)
for seed in 0 1 2; do
  python benchmarks/experiment.py run "${E[@]}" --arms base --seeds $seed --unlabelled-samples 0
  python benchmarks/experiment.py run "${E[@]}" --arms vq,control,pushforward,ceiling --seeds $seed --unlabelled-samples 48
done
python benchmarks/experiment.py run "${E[@]}" --arms beamvq,two_stage,authors_leak --seeds 0,1,2 --unlabelled-samples 48
