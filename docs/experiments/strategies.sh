#!/usr/bin/env bash
# The runs behind docs/results.md, "Strategies against forgetting". 2 CPU cores; outputs under runs/results/.
# Each block is independent: docs/experiments/strategies.sh BLOCK
set -euo pipefail
cd "$(dirname "$0")/../.."
F=.venv/bin/forgetless
OUT=runs/results

tiny() {  # every strategy, 3 seeds x 3 task orders, on the tiny stream: the protocol end to end
  $F compare configs/tiny/compare.yaml --strategies naive,cumulative,joint,replay,lwf,ewc,agem,derpp \
     --seeds 3 --orders 3 output_dir=$OUT/tiny-compare-3x3 overwrite=true --no-progress
}

combined() {  # replay alone against replay with LwF and replay with EWC (strategy: [replay, X]), 3 seeds
  $F compare configs/tiny/compare.yaml --strategies replay,replay+lwf,replay+ewc --seeds 3 \
     output_dir=$OUT/tiny-combined overwrite=true --no-progress
}

ewc_sweep() {  # lambda from the first task's training rows only (docs/experiments/ewc_lambda_sweep.py)
  local stream=$1; shift
  .venv/bin/python docs/experiments/ewc_lambda_sweep.py configs/$stream.yaml --out $OUT/ewc-sweep-$stream "$@"
}

replay_budget() {  # average accuracy against the buffer's size: rows kept per task
  local stream=$1; shift
  for rows in 25 50 100 200 400; do
    $F run configs/$stream.yaml strategy.name=replay replay.rows_per_task=$rows \
       output_dir=$OUT/replay-budget-$stream/rows-$rows overwrite=true --no-progress "$@"
  done
}

each() {  # one run per strategy from the stream's own start, seed 0, the config's order; EWC at the lambda of
          # the task-incremental sweep: each STREAM [STRATEGY ...]
  local stream=$1; shift
  local strategies=("$@")
  [ ${#strategies[@]} -gt 0 ] || strategies=(naive replay lwf joint ewc derpp cumulative agem)
  for s in "${strategies[@]}"; do
    local extra=()
    [ "$s" = ewc ] && extra=(strategy.lambda=10000)
    $F run configs/$stream.yaml strategy.name=$s "${extra[@]}" output_dir=$OUT/$stream-warm/$s overwrite=true \
       --no-progress > $OUT/$stream-warm-$s.log 2>&1 || echo "$stream $s: failed, see $OUT/$stream-warm-$s.log"
  done
}

streams() {  # every strategy on a built-in stream: seeds x orders
  local stream=$1 seeds=${2:-3} orders=${3:-3}; shift 3 || true
  $F compare configs/$stream.yaml --strategies naive,cumulative,joint,replay,lwf,ewc,agem,derpp \
     --seeds $seeds --orders $orders output_dir=$OUT/$stream-strategies overwrite=true --no-progress "$@"
}

"$@"
