#!/usr/bin/env bash
# Rebuild the shipped model bundle from data: train, then quantise behind the accuracy gate.
source "$(dirname "$0")/venv.sh"
ensure_venv .venv-train "[train]"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv-train/bin/edge-train --out build/train "$@"
.venv-train/bin/edge-quantize --train-dir build/train --out "${BUNDLE_OUT:-models/mnist-int8}"
