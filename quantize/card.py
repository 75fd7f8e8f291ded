"""MODEL_CARD.md for a bundle, written from its manifest so the numbers cannot drift from it."""

from __future__ import annotations


def _confident_errors(metrics: dict) -> str:
    errors = metrics.get("test_confident_errors")
    return "" if errors is None else f" ({errors} wrong digits accepted)"


def _per_class_table(per_class: dict[str, float]) -> str:
    header = "| digit | " + " | ".join(per_class) + " |"
    rule = "|---" * (len(per_class) + 1) + "|"
    row = "| int8 accuracy | " + " | ".join(f"{v:.3f}" for v in per_class.values()) + " |"
    return "\n".join([header, rule, row])


ARCHITECTURE_TEXT = {
    "mnist_cnn": "The data scientist's Keras MNIST CNN, unchanged: Conv2D 32 3x3 relu, Conv2D 64 3x3 relu, "
                 "MaxPool 2, Dropout 0.25, Flatten, Dense 128 relu, Dropout 0.5, Dense 10 softmax",
    "bn_cnn": "A small batch-norm CNN (training/model.py `bn_cnn`): Conv2D 32 5x5, Conv2D 64 3x3 and "
              "Conv2D 128 3x3, each with batch norm, relu and a 2x2 max-pool, Dropout 0.25, Dense 128 "
              "with batch norm and relu, Dropout 0.4, Dense 10 softmax (the converter folds the batch "
              "norms into the convolutions)",
}
QUANTISATION_TEXT = """Full-integer post-training quantisation (every op an int8 builtin; uint8 input
taking raw pixels, scale 1/255; int8 output of the logits, to which the runtime applies the
temperature and the softmax), calibrated on 500 training images. Runs under LiteRT with XNNPACK.
The graph ends at the logits because a uint8 softmax output saturates at 255/256 for most digits
and leaves the acceptance threshold nothing to separate sure from unsure reads."""


def _model_section(manifest: dict) -> str:
    model = manifest.get("model") or {"architecture": "mnist_cnn", "members": 1}
    architectures = str(model.get("architecture", "mnist_cnn")).split("+")
    text = "; ".join(ARCHITECTURE_TEXT.get(a, a) for a in architectures)
    members = int(model.get("members", 1))
    parameters = model.get("parameters")
    size = f" ({parameters / 1e6:.2f} M parameters in all)" if parameters else ""
    one_graph = (f"The members run side by side in ONE int8 graph on one input and their logits are "
                 f"averaged inside it{size}: a frame's digits still cost one invoke.")
    if members > 1 and model.get("member_architectures"):
        # Members of different kinds: each named with its seed and its training data.
        lines = [f"An ensemble of {members} independently trained members:"]
        for i, (architecture, seed, crops) in enumerate(zip(
                model["member_architectures"], model.get("member_seeds", [None] * members),
                model.get("member_reader_copies", [0] * members)), start=1):
            trained = (f"; trained with {crops} reader crops of each training digit added (rendered envelope "
                       "frames cut by the agent's own reader, `training/reader_crops.py`)" if crops else "")
            lines.append(f"- member {i} (seed {seed}): {ARCHITECTURE_TEXT.get(architecture, architecture)}{trained}.")
        lines.append("\n" + one_graph)
    elif members > 1:
        seeds = ", ".join(str(s) for s in model.get("member_seeds", []))
        lines = [f"An ensemble of {members} independently trained members (seeds {seeds}), each "
                 f"{text[0].lower() + text[1:]}.", one_graph]
    else:
        lines = [f"{text}{size}."]
    if model.get("recalibrated_from"):
        lines.append(f"The `model.tflite` of {model['recalibrated_from']}, byte for byte; this version adds the "
                     "temperature calibration and the acceptance threshold re-chosen on calibrated probabilities.")
    return "## Model\n" + "\n".join(lines) + "\n" + QUANTISATION_TEXT + "\n"


def _seeds(seed) -> str:
    """'seed 1234', or 'seeds 1234 and 102' for an ensemble's members."""
    if isinstance(seed, list):
        return "seeds " + (", ".join(map(str, seed[:-1])) + " and " + str(seed[-1]) if len(seed) > 1 else str(seed[0]))
    return f"seed {seed}"


def _figures_row(label: str, figures: dict) -> str:
    return (f"| {label} | {figures['digits']} | {figures['ece_before']:.4f} | {figures['ece_after']:.4f} | "
            f"{figures['nll_before']:.4f} | {figures['nll_after']:.4f} |")


def _bands_table(test: dict) -> str:
    rows = ["| top-class probability | digits (T = 1) | errors predicted / seen (T = 1) | "
            "digits (calibrated) | errors predicted / seen (calibrated) |", "|---|---|---|---|---|"]
    for before, after in zip(test["bands_before"], test["bands_after"]):
        band = f"[{before['low']}, {before['high']}{']' if before['high'] >= 1 else ')'}"
        rows.append(f"| {band} | {before['digits']} | {before['predicted_errors']:.1f} / {before['observed_errors']} "
                    f"| {after['digits']} | {after['predicted_errors']:.1f} / {after['observed_errors']} |")
    return "\n".join(rows)


def _reliability_table(test: dict) -> str:
    rows = ["| confidence bin | digits | mean confidence | accuracy |", "|---|---|---|---|"]
    after = test["reliability_after"]
    bins = len(after["counts"])
    for i, count in enumerate(after["counts"]):
        if count:
            rows.append(f"| ({i / bins:.3f}, {(i + 1) / bins:.3f}] | {count} | "
                        f"{after['mean_confidence'][i]:.4f} | {after['accuracy'][i]:.4f} |")
    return "\n".join(rows)


def _calibration_section(manifest: dict) -> str:
    c = manifest.get("calibration")
    if not c:
        return ("## Calibration\nNone: the probabilities are the plain softmax of the int8 logits "
                "(temperature 1).\n")
    figure = f"reliability-{manifest['name']}-{manifest['version']}"
    return f"""## Calibration
Probabilities are softmax(logits / T) with T = {c['temperature']:.4f}, one parameter fitted by
minimum negative log-likelihood on the {c['fitted_on']}. T changes no argmax, so accuracy is
unchanged; it spreads the over-confident top scores so that a probability can be read as one: the
decoder that multiplies digit probabilities into a postcode posterior relies on that. Expected
calibration error (top label, {c['ece_bins']} equal-width bins) and mean negative log-likelihood,
before (T = 1) and after:

| data | digits | ECE before | ECE after | NLL before | NLL after |
|---|---|---|---|---|---|
{_figures_row("validation (fit set: real + augmented)", c['validation'])}
{_figures_row("validation, real digits only", c['validation_real_digits'])}
{_figures_row(c['test']['dataset'] + ", reporting only", c['test'])}

Near certainty, where the acceptance threshold lives, the equal-width bins say little (almost
every digit falls in the top one); errors predicted (the sum of 1 - confidence) against errors
seen on the test set:

{_bands_table(c['test'])}

Reliability on the test set after calibration (non-empty bins):

{_reliability_table(c['test'])}

Reliability diagrams (T = 1 beside calibrated), in the source repository: `docs/img/{figure}-validation.png`
and `docs/img/{figure}-t10k.png`.
"""


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

{_model_section(manifest)}
## Data and its limits
- Trained on {t['train_images']} images, validated (early stopping, temperature, threshold) on
  {t['validation_images']} held-out training images; source `{t['data_source']}`, {_seeds(t['seed'])}.
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

{_calibration_section(manifest)}
## Acceptance threshold
`acceptance_threshold` = {th['threshold']:.4f} on the {"calibrated " if manifest.get("calibration") else ""}top-class probability: the lowest value at
which the accepted validation digits reach {th['target_precision']:.1%} precision with 95%
confidence (one-sided Wilson upper bound on the error rate), over {th['validation_digits']}
validation digits (the held-out training images plus augmented copies of them): validation
coverage {th['validation_coverage']:.1%}, precision {th['validation_precision']:.4%}. On the test set this threshold accepts
{m['test_coverage_at_threshold']:.1%} of digits at {m['test_precision_at_threshold']:.4%} precision{_confident_errors(m)}.
The test set was never used to choose it (nor the temperature).

## Known failure modes
- Confusions concentrate on 4/9, 7/2, 3/5 and 8/9 pairs (see the confusion matrix in
  `manifest.json`).
- Digits the reader cut badly (touching digits split wrong, a broken stroke left as two
  components, a box line that touches a digit) look unlike MNIST and get low confidence;
  they go to review rather than to a wrong bin, which is the point of the threshold.
- Light-on-dark writing, colour and uneven light are handled by the reader, not the model.
- Confidence is the softmax of int8 logits divided by the temperature: steps of one logit
  quantum. The temperature is fitted on MNIST-style validation digits; on a site's own digits
  (other writers, the reader's cuts) calibration can drift, and should be re-checked on
  labelled review traffic.

## Monitoring
`manifest.json` carries the baselines the status page compares live traffic with: training
class distribution, test prediction distribution, test confidence histogram and ink fraction.
"""
