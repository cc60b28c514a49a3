#!/usr/bin/env bash
# The runs behind docs/results.md, "Table 1, measured". 2 CPU cores; outputs under runs/results/.
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

own() {  # our own small T5 or BART, pretrained on the chitchat corpus: own t5 | own bart
  local arch=$1
  $F table1 configs/table1.yaml model.arch=$arch model.encoder=null model.pretrain=configs/pretrain/${arch}_small.yaml \
     output_dir=$OUT/table1-$arch overwrite=true --no-progress
}

"$@"
