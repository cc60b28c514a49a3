#!/usr/bin/env bash
# The runs behind docs/results.md, "Continuing from a pretrained model". Seed 0, 2 CPU cores.
# Each block is independent; outputs go to runs/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
F=.venv/bin/forgetless
OUT=runs/results

warm_start() {  # the warm start (MiniLM encoder-decoder) vs the same architecture from random init
  for w in pretrained random; do
    $F run configs/domain_incremental.yaml model.weights=$w output_dir=$OUT/di-warm-$w overwrite=true --no-progress
  done
}

own() {  # our own small T5 and BART: pretrain, then the domain-incremental stream from each
  local arch=$1
  $F pretrain configs/pretrain/${arch}_small.yaml --no-progress
  # our byte-level tokenizer spends up to 4 pieces on "neutral": room for 8 (the warning names the need)
  local common=(model.arch=$arch model.encoder=null model.pretrain=configs/pretrain/${arch}_small.yaml
                training.lr=1e-3 stream.max_target_tokens=8 evaluation.max_new_tokens=8 overwrite=true --no-progress)
  # naive, replay and LwF from the checkpoint, with the pretraining task as task 0 and the recovery probe
  $F compare configs/domain_incremental.yaml --strategies naive,replay,lwf --seeds 1 "${common[@]}" \
     stream.pretraining_task=true recovery.enabled=true replay.rows_per_task=200 output_dir=$OUT/di-$arch-own
  # the same architecture and tokenizer from random init, same steps and seed
  $F run configs/domain_incremental.yaml "${common[@]}" model.weights=random output_dir=$OUT/di-$arch-random
}

curves() {  # T5 vs BART pretraining curves, from MLflow (after `own t5` and `own bart`)
  local dirs=()
  for arch in t5 bart; do
    dirs+=("$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['init']['checkpoint'])" \
              $OUT/di-$arch-own/naive/seed-0/report.json)")
  done
  .venv/bin/python docs/experiments/pretraining_curves.py "${dirs[@]}"
}

task_incremental() {  # the config's warm start vs the small T5 from scratch it used before
  # (model.weights=random gives the warm start's architecture from random init; not run for docs/results.md)
  $F run configs/task_incremental.yaml output_dir=$OUT/ti-warm-pretrained overwrite=true --no-progress
  $F run configs/task_incremental.yaml model.arch=t5 model.encoder=null model.preset=small \
     model.tokenizer.vocab_size=4000 model.tokenizer.train_on=all_tasks training.max_steps=600 training.lr=1e-3 \
     output_dir=$OUT/ti-t5-scratch overwrite=true --no-progress
}

box2() {
  .venv/bin/python docs/experiments/box2_class_order.py configs/box2_class_order.yaml
}

"${@:-warm_start}"
