#!/usr/bin/env bash
# Prepares what infra/scripts/gpu_check.sh needs on a GPU machine that reaches no package index:
# wheels, in .gpu_wheels/ (git-ignored), of what such a machine's image lacks — DeepSpeed (built
# here as a pure-Python wheel: its ops compile on first use), pydantic, omegaconf and their needs,
# and transformers at the version tested here (the image's may be older) —
# at the versions this project is tested with (read from .venv). About 19 MB.
#
#   infra/scripts/prepare_gpu_check.sh          then carry .gpu_wheels with the working tree
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=.gpu_wheels
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$OUT" && mkdir -p "$OUT"
# compiled: for the GPU machine's CPython 3.12 on x86-64
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "pydantic-core==$(version pydantic-core)"
# pure Python
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" \
  "pydantic==$(version pydantic)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "omegaconf==$(version omegaconf)" "hjson==$(version hjson)" "transformers==$(version transformers)"
# DeepSpeed ships as a source distribution: build the wheel here, no ops compiled into it
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"
ls -la "$OUT"
du -sh "$OUT"
