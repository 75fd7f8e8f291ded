"""MODEL_CARD.md for a bundle, written from its manifest so the numbers cannot drift from it."""

from __future__ import annotations


def _per_class_table(per_class: dict[str, float]) -> str:
    header = "| digit | " + " | ".join(per_class) + " |"
    rule = "|---" * (len(per_class) + 1) + "|"
    row = "| int8 accuracy | " + " | ".join(f"{v:.3f}" for v in per_class.values()) + " |"
    return "\n".join([header, rule, row])


def render_model_card(manifest: dict) -> str:
    m, t, th = manifest["metrics"], manifest["training"], manifest["threshold_selection"]
    return f"""# Model card: {manifest['name']} {manifest['version']}

Created {manifest['created']}; `model.tflite` sha256 `{manifest['sha256']}`.

## Intended use
Reading single handwritten digits of postcodes on envelopes at postal sorting offices, on
site hardware, as one stage of the edge agent: the OpenCV reader cuts each digit out of a
camera frame and normalises it to MNIST style (28x28, white ink on black, fitted to 20x20,
centred by centre of mass); this model classifies the batch of digits. A postcode is sent to
a sorting machine only when every digit clears the acceptance threshold below; every other
read goes to human review. Not for letters, printed text, or digits outside that encoding.

## Model
The data scientist's Keras MNIST CNN, unchanged: Conv2D 32 3x3 relu, Conv2D 64 3x3 relu,
MaxPool 2, Dropout 0.25, Flatten, Dense 128 relu, Dropout 0.5, Dense 10 softmax (1.2 M
parameters). Full-integer post-training quantisation (every op an int8 builtin; uint8 input
taking raw pixels, scale 1/255; int8 output of the logits, to which the runtime applies the
softmax), calibrated on 500 training images. Runs under LiteRT with XNNPACK. The graph ends
at the logits because a uint8 softmax output saturates at 255/256 for most digits and
leaves the acceptance threshold nothing to separate sure from unsure reads.

## Data and its limits
- Trained on {t['train_images']} images, validated (early stopping, threshold) on
  {t['validation_images']} held-out training images; source `{t['data_source']}`, seed {t['seed']}.
- On the development machines only 5,000 of the 60,000 MNIST training images exist, so
  training leans on augmentation (rotation about +/-12 degrees, zoom +/-15%, shifts of 10%,
  thicker or thinner strokes). With the full 60k set (`edge-train --data DIR` with the full
  IDX files) expect about half the errors, and a lower threshold at the same precision.
- MNIST digits are US Census and high-school writers of the 1990s, centred and size
  normalised. Real envelopes differ: the reader must reproduce that normalisation, and
  writing styles of other countries (crossed 7s, open 4s, 1s with a long flag) are
  under-represented.

## Metrics ({m['dataset']})
| model | accuracy |
|---|---|
| float (Keras) | {m['float_accuracy']:.4f} |
| int8 (LiteRT) | {m['int8_accuracy']:.4f} |
| drop | {m['int8_drop_pp']:.2f} pp |

{_per_class_table(m['int8_per_class_accuracy'])}

## Acceptance threshold
`acceptance_threshold` = {th['threshold']:.4f} on the top-class probability: the lowest value at
which the accepted validation digits reach {th['target_precision']:.1%} precision with 95%
confidence (one-sided Wilson upper bound on the error rate), over {th['validation_digits']}
validation digits (the held-out training images plus augmented copies of them): validation
coverage {th['validation_coverage']:.1%}, precision {th['validation_precision']:.4%}. On the test set this threshold accepts
{m['test_coverage_at_threshold']:.1%} of digits at {m['test_precision_at_threshold']:.4%} precision.
The test set was never used to choose it.

## Known failure modes
- Confusions concentrate on 4/9, 7/2, 3/5 and 8/9 pairs (see the confusion matrix in
  `manifest.json`).
- Digits the reader cut badly (touching digits split wrong, a broken stroke left as two
  components, a box line that touches a digit) look unlike MNIST and get low confidence;
  they go to review rather than to a wrong bin, which is the point of the threshold.
- Light-on-dark writing, colour and uneven light are handled by the reader, not the model.
- Confidence is the softmax of int8 logits: steps of one logit quantum, fine enough for the
  threshold but not a calibrated probability far from it.

## Monitoring
`manifest.json` carries the baselines the status page compares live traffic with: training
class distribution, test prediction distribution, test confidence histogram and ink fraction.
"""
