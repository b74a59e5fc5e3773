#!/usr/bin/env bash
# Two stages as the papers run them (issue 17 item 4), 8 labelled + 48 unlabelled, seeds 0, 1, 2:
# stage 1 = the base at 80 epochs (--trainer.max_epochs=80: its n8 plateau, best epoch 60 of 80;
# the keys of the base rows of ns_scarce_80_epochs.sh, so a row there is reused, and redone into
# its folder without a second row when its checkpoint is gone), then stage 3 = 30-epoch fine-tunes
# of its best-validation checkpoint (configs/experiments/arms/ft_*.yaml): ft_base (the control:
# the same fine-tuning without VQ or search), ft_vq, ft_pushforward, ft_beamvq.
# Run it after ns_scarce_80_epochs.sh has finished (both would train the same stage-1 runs).
# Extra arguments go to every run, e.g. --jobs 2, or another pool share (30 % of the 72 training
# windows): --override=--data.init_args.pool.capacity=22 (its own keys and table).
# Report: python benchmarks/experiment.py report benchmarks/results/experiments_ns_scarce.jsonl
cd "$(dirname "$0")/../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled
R=benchmarks/results/experiments_ns_scarce.jsonl
S=(--init-from-arm base --init-from-override=--trainer.max_epochs=80 --results $R
   --train-samples 8 --unlabelled-samples 48)
for seed in 0 1 2; do  # seed by seed: each seed's stage 1, then its four fine-tunes
  python benchmarks/experiment.py run "${S[@]}" --arms ft_base,ft_vq,ft_pushforward,ft_beamvq \
    --seeds $seed "$@"
done
