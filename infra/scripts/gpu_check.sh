#!/usr/bin/env bash
# One-GPU check of the training path: NCCL collectives, bf16 ZeRO-2/3 throughput and MFU for T5 and
# BART at the base preset, training state saved and restored. At most 5 minutes. Drives pipelines/
# directly: the GPU machine needs torch, transformers, tokenizers and pyarrow, plus the wheels that
# infra/scripts/prepare_gpu_check.sh puts in .gpu_wheels/ (run it here first, carry that folder).
#
#   infra/scripts/gpu_check.sh OUT_DIR [--archs t5,bart] [--zero 2,3]     -> OUT_DIR/gpu_check.json
set -euo pipefail
out=${1:?usage: infra/scripts/gpu_check.sh OUT_DIR [options]}
shift
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ -d .gpu_wheels ]; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu_wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout 290 "$PY" infra/scripts/gpu_check.py --out "$out" "$@"
