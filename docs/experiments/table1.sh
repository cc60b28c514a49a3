#!/usr/bin/env bash
# The lecture's Table 1 measured on each start (`forgetless table1`). 2 CPU cores; outputs under runs/results/
# Each block is independent: docs/experiments/table1.sh BLOCK
set -euo pipefail
cd "$(dirname "$0")/../.."
F=.venv/bin/forgetless
OUT=runs/results

tiny() {  # the tiny pretrained T5 (built once into the cache): the machinery, 12 short runs
  $F table1 configs/tiny/table1.yaml output_dir=$OUT/table1-tiny overwrite=true --no-progress
}

warm() {  # the warm start: all-MiniLM-L6-v2 as the encoder of a BERT2BERT
  $F table1 configs/table1.yaml output_dir=$OUT/table1-warm overwrite=true --no-progress
}

own_model() {  # the settings that put our own small T5 or BART in place of the warm start: own_model t5 | bart
  # Their 4,000-piece byte-level vocabulary can spend over 400 pieces on a 2-shot SMS prompt (320 refused 4 of 200): 512 source tokens.
  echo model.arch=$1 model.encoder=null model.pretrain=configs/pretrain/$1_small.yaml stream.max_source_tokens=512
}

own() {  # our own small T5 or BART, pretrained on the chitchat corpus: own t5 | own bart
  # Fine-tuning at lr 1e-3, the rate the small models use everywhere else (at the config's 1e-4, the warm
  # start's BERT rate, the small T5 reached only the majority classes); heads and prompts keep paradigm.lr.
  local arch=$1
  $F table1 configs/table1.yaml $(own_model $arch) training.lr=1e-3 output_dir=$OUT/table1-$arch overwrite=true \
     --no-progress
}

likelihood() {  # prompt engineering and prompt tuning scored by ranking each task's label set: warm | t5 | bart
  # Separates "cannot write a label" from "cannot tell the classes apart" (greedy generation gave 0 on every start).
  local start=$1 model=""
  [ "$start" = warm ] || model=$(own_model $start)
  $F table1 configs/table1.yaml $model 'table1.paradigms=[prompt_engineering,prompt_tuning]' \
     evaluation.scoring=likelihood output_dir=$OUT/table1-$start-likelihood overwrite=true --no-progress
}

"$@"
