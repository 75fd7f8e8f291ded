#!/usr/bin/env bash
# Rebuild the shipped model bundle from data: train, quantise behind the accuracy gate, calibrate
# (temperature and threshold on validation), and add the self-test the model sync requires.
#
#   scripts/model.sh [edge-train options, e.g. --data DIR]
#
# RECIPE picks what is trained (docs/MODELS.md compares them):
#   shipped    (default, the shipped 1.1.0) two members in one int8 graph, their logits averaged:
#              the data scientist's CNN (seed 1234, as 1.0.0 was trained) and a batch-norm CNN
#              (seed 102, 20 cosine epochs) trained with 3 reader crops of every training digit
#   reference  the data scientist's CNN alone, seed 1234 (1.0.0; 1.0.1 is it recalibrated)
#   reference_crops the same CNN, 15 cosine epochs, with 3 reader crops of every training digit
#              added (training.reader_crops); a candidate, not shipped (docs/MODELS.md)
#   bn_cnn     one batch-norm CNN (seed 101, 12 cosine epochs)
#   bn_cnn_x3  three of them (seeds 101/102/103, 12/8/8 epochs) averaged in one int8 graph
#   bn_cnn_crops one batch-norm CNN (seed 101, 20 cosine epochs) with 3 reader crops of every
#              training digit added; a candidate, not shipped (docs/MODELS.md, section 7)
# BUNDLE_OUT and BUNDLE_VERSION override the bundle folder and its version (default: the next
# minor of the bundle being replaced); FIGURES the folder of the reliability diagrams (docs/img).
source "$(dirname "$0")/venv.sh"
ensure_venv .venv-train "[train]"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
BUNDLE_OUT="${BUNDLE_OUT:-models/mnist-int8}"
RECIPE="${RECIPE:-shipped}"
# Every member holds out the same validation digits (the 1,000 that 1.0.0 was validated on), so the
# temperature and the threshold are fitted on digits no member trained on.
SPLIT_SEED=1234

case "$RECIPE" in
  shipped|reference|reference_crops|bn_cnn_crops) MEMBERS=() ;;
  bn_cnn) MEMBERS=("101:12") ;;
  bn_cnn_x3) MEMBERS=("101:12" "102:8" "103:8") ;;  # seed:epochs
  *) echo "error: RECIPE must be shipped, reference, reference_crops, bn_cnn, bn_cnn_x3 or bn_cnn_crops, not $RECIPE" >&2; exit 2 ;;
esac

train_dirs=()
if [ "$RECIPE" = shipped ]; then
  nice -n 10 .venv-train/bin/edge-train --seed 1234 --split-seed "$SPLIT_SEED" --out build/train/reference "$@"
  nice -n 10 .venv-train/bin/edge-train --architecture bn_cnn --lr-schedule cosine --epochs 20 --reader-copies 3 \
    --seed 102 --split-seed "$SPLIT_SEED" --out build/train/bn_cnn_crops-102 "$@"
  train_dirs+=(--train-dir build/train/reference --train-dir build/train/bn_cnn_crops-102)
elif [ "$RECIPE" = reference ]; then
  # nice: build machines share their cores with other jobs.
  nice -n 10 .venv-train/bin/edge-train --out build/train "$@"
  train_dirs+=(--train-dir build/train)
elif [ "$RECIPE" = reference_crops ]; then
  nice -n 10 .venv-train/bin/edge-train --lr-schedule cosine --epochs 15 --reader-copies 3 \
    --seed 1234 --split-seed "$SPLIT_SEED" --out build/train "$@"
  train_dirs+=(--train-dir build/train)
elif [ "$RECIPE" = bn_cnn_crops ]; then
  nice -n 10 .venv-train/bin/edge-train --architecture bn_cnn --lr-schedule cosine --epochs 20 --reader-copies 3 \
    --seed 101 --split-seed "$SPLIT_SEED" --out build/train "$@"
  train_dirs+=(--train-dir build/train)
else
  for member in "${MEMBERS[@]}"; do
    seed="${member%%:*}" epochs="${member##*:}"
    out="build/train/bn_cnn-$seed"
    nice -n 10 .venv-train/bin/edge-train --architecture bn_cnn --lr-schedule cosine --epochs "$epochs" \
      --seed "$seed" --split-seed "$SPLIT_SEED" --out "$out" "$@"
    train_dirs+=(--train-dir "$out")
  done
fi
.venv-train/bin/edge-quantize "${train_dirs[@]}" --out "$BUNDLE_OUT" --figures "${FIGURES:-docs/img}" \
  ${BUNDLE_VERSION:+--version "$BUNDLE_VERSION"}
.venv-train/bin/edge-sync add-selftest "$BUNDLE_OUT" --digits edge_agent/assets/demo_digits.npz
