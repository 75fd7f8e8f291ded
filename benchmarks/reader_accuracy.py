"""Postcode read accuracy of reader + int8 classifier + decision on rendered camera frames.

    python benchmarks/reader_accuracy.py [--frames 1000] [--seed 7] [--model models/mnist-int8] [--json]

Frames are rendered from MNIST t10k digits (the held-out test set: evaluation only, never
tuning). ``--split val`` renders from the 1,000 training digits the model held out for
validation (what the reader was tuned on); ``--split train`` from all training digits.
The "model on source digits" line classifies the original 28x28 digits of the same
postcodes: the ceiling a perfect reader could reach with this model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from edge_agent.decision import decide  # noqa: E402
from edge_agent.loader import load_bundle  # noqa: E402
from edge_agent.mnist import load_split, locate_data_dir  # noqa: E402
from edge_agent.pipeline import digit_evidence  # noqa: E402
from edge_agent.reader import ReaderConfig  # noqa: E402
from edge_agent.mnist import DigitSet  # noqa: E402
from edge_agent.render import FrameConditions, render_postcode_samples  # noqa: E402

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = (ROOT / "models" / "mnist-int8",)


@dataclass
class Tally:
    """Counts for one slice of the frames."""

    frames: int = 0
    exact: int = 0
    accepted: int = 0
    accepted_right: int = 0
    count_right: int = 0

    def add(self, exact: bool, accepted: bool, count_right: bool) -> None:
        self.frames += 1
        self.exact += exact
        self.accepted += accepted
        self.accepted_right += accepted and exact
        self.count_right += count_right

    def summary(self) -> dict[str, float | int]:
        n = max(1, self.frames)
        return {
            "frames": self.frames,
            "exact_rate": self.exact / n,
            "accepted_rate": self.accepted / n,
            "precision_among_accepted": self.accepted_right / self.accepted if self.accepted else 1.0,
            "wrong_accepted": self.accepted - self.accepted_right,
            "digit_count_right_rate": self.count_right / n,
        }


def condition_tags(c: FrameConditions) -> list[str]:
    """The slices a frame belongs to, for the per-condition breakdown."""
    tags = [f"paper:{c.paper}", f"field:{c.field}", f"ink:{c.ink}"]
    degraded = {
        "inverted": c.inverted,
        "rotated>1deg": abs(c.rotation) > 1.0,
        "uneven_light>0.3": c.illumination > 0.3,
        "blur>1.2": c.blur > 1.2,
        "jpeg<60": 0 < c.jpeg_quality < 60,
        "noise>5": c.noise > 5,
        "thin_pen": c.stroke < 0,
        "thick_pen": c.stroke > 1,
        "digits<55px": c.digit_height < 55,
        "digits>75px": c.digit_height > 75,
        "specks": c.specks > 0,
    }
    tags += [name for name, present in degraded.items() if present]
    if not any(degraded.values()) and c.field == "none" and c.paper in ("white", "cream"):
        tags.append("clean")
    return tags


def find_model(explicit: str | None) -> Path:
    """--model, else the shipped bundle."""
    candidates = [Path(explicit)] if explicit else list(DEFAULT_MODELS)
    for path in candidates:
        if (path / "manifest.json").exists():
            return path
    raise SystemExit(f"no model bundle in {', '.join(map(str, candidates))}: pass --model DIR")


def load_digits(data_dir: Path, split: str) -> DigitSet:
    """t10k for 'test'; the model's validation hold-out of the training digits for 'val'."""
    if split == "test":
        return load_split(data_dir, "test")
    train = load_split(data_dir, "train")
    if split == "train":
        return train
    from training.data import stratified_split  # the same hold-out the model was validated on

    _, val_idx = stratified_split(train.labels, per_class=100, seed=1234)
    return train.subset(val_idx)


def run(frames: int, seed: int, model_dir: Path, data_dir: Path, split: str, length: int,
        digit_height: float | None = None) -> dict:
    """Render, read, classify and decide every frame; return the summary."""
    digits = load_digits(data_dir, split)
    model = load_bundle(model_dir)
    threshold = model.manifest.acceptance_threshold
    config = ReaderConfig(expected_lengths=(length,))
    rng = np.random.default_rng(seed)
    pinned = {} if digit_height is None else {"digit_height": digit_height}  # else 40-90 px, drawn per frame
    samples = render_postcode_samples(digits, frames, rng, length=length, **pinned)

    total, oracle, by_tag = Tally(), Tally(), defaultdict(Tally)
    reader_s, classifier_s, reasons = 0.0, 0.0, defaultdict(int)
    for sample in samples:
        evidence = digit_evidence(sample.frame, model.classifier, config)
        located = evidence.located
        reader_s, classifier_s = reader_s + evidence.seconds[0], classifier_s + evidence.seconds[1]
        decision = decide(evidence.labels, evidence.probabilities(with_plan=False), config.expected_lengths, threshold)
        exact = decision.postcode == sample.postcode
        count_right = len(located.digits) == len(sample.postcode)
        total.add(exact, decision.accepted, count_right)
        for tag in condition_tags(sample.conditions):
            by_tag[tag].add(exact, decision.accepted, count_right)
        reasons[decision.reason.value if decision.reason else "accepted"] += 1

        source = model.classifier.classify(digits.images[sample.digit_indices])
        ideal = decide(source.labels, source.probabilities, config.expected_lengths, threshold)
        oracle.add(ideal.postcode == sample.postcode, ideal.accepted, True)

    return {
        "split": split,
        "frames": frames,
        "seed": seed,
        "postcode_length": length,
        "digit_height_px": digit_height,
        "model": str(model_dir),
        "model_version": model.version,
        "acceptance_threshold": threshold,
        **total.summary(),
        "reader_ms_per_frame": 1000 * reader_s / max(1, frames),
        "classifier_ms_per_frame": 1000 * classifier_s / max(1, frames),
        "decisions": dict(reasons),
        "model_on_source_digits": oracle.summary(),
        "by_condition": {tag: by_tag[tag].summary() for tag in sorted(by_tag)},
    }


def print_report(s: dict) -> None:
    """Human-readable table of the summary."""
    print(f"{s['frames']} frames from MNIST {s['split']} digits, model {s['model_version']} "
          f"(threshold {s['acceptance_threshold']:.6g})")
    print(f"  exact postcode read     {100 * s['exact_rate']:6.2f} %")
    print(f"  accepted                {100 * s['accepted_rate']:6.2f} %")
    print(f"  precision among accepted{100 * s['precision_among_accepted']:7.2f} %  "
          f"({s['wrong_accepted']} wrong accepted)")
    print(f"  digit count right       {100 * s['digit_count_right_rate']:6.2f} %")
    print(f"  reader {s['reader_ms_per_frame']:.2f} ms/frame, classifier {s['classifier_ms_per_frame']:.2f} ms/frame")
    print(f"  decisions {s['decisions']}")
    o = s["model_on_source_digits"]
    print(f"  model on source digits  exact {100 * o['exact_rate']:.2f} %, accepted {100 * o['accepted_rate']:.2f} %, "
          f"precision {100 * o['precision_among_accepted']:.2f} %")
    print(f"  {'condition':<18}{'frames':>7}{'exact%':>8}{'accept%':>9}{'prec%':>8}{'count%':>8}")
    for tag, t in s["by_condition"].items():
        print(f"  {tag:<18}{t['frames']:>7}{100 * t['exact_rate']:>8.1f}{100 * t['accepted_rate']:>9.1f}"
              f"{100 * t['precision_among_accepted']:>8.1f}{100 * t['digit_count_right_rate']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", help="model bundle folder (default models/mnist-int8)")
    parser.add_argument("--data", help="MNIST folder (default: $MNIST_DIR or ../shared/datasets/mnist)")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="digits: test = t10k (report), val = model's held-out training digits (tuning)")
    parser.add_argument("--length", type=int, default=5, help="digits per postcode")
    parser.add_argument("--digit-height", type=float,
                        help="render every digit this many px tall (a camera further away; default 40-90 px)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    data_dir = locate_data_dir(args.data)
    if data_dir is None:
        raise SystemExit("no MNIST data: pass --data DIR or set $MNIST_DIR")
    summary = run(args.frames, args.seed, find_model(args.model), data_dir, args.split, args.length, args.digit_height)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
