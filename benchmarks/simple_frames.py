"""A second, deliberately plain renderer as a cross-check of the reader on frames it was not tuned on.

t10k digits as dark ink on light grey paper, 50-100 px tall, evenly spaced with a small
baseline jitter, mild blur, sensor noise and JPEG 85. Prints exact / accepted / precision.

    python benchmarks/simple_frames.py [--frames 500] [--seed 123]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.loader import load_bundle  # noqa: E402
from edge_agent.mnist import load_split, locate_data_dir  # noqa: E402
from edge_agent.pipeline import PostcodeReader  # noqa: E402
from edge_agent.reader import ReaderConfig  # noqa: E402


def plain_frame(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on light paper, 640x480 BGR, JPEG round trip."""
    frame = np.ones((480, 640, 3), np.float32) * float(rng.integers(200, 256))
    ink = rng.integers(0, 80, 3).astype(np.float32)
    height = int(rng.integers(50, 100))
    x, y = int(rng.integers(40, 120)), int(rng.integers(120, 300))
    for i, digit in enumerate(digits):
        alpha = cv2.resize(digit, (height, height)).astype(np.float32)[..., None] / 255.0
        left, top = x + i * int(height * 0.8), y + int(rng.integers(-5, 6))
        if left + height >= 640:
            break
        patch = frame[top:top + height, left:left + height]
        frame[top:top + height, left:left + height] = patch * (1 - alpha) + ink * alpha
    frame = cv2.GaussianBlur(frame, (0, 0), 0.8) + rng.normal(0, 3, frame.shape)
    _, jpeg = cv2.imencode(".jpg", np.clip(frame, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-int8")
    args = parser.parse_args()
    data = locate_data_dir(None)
    if data is None:
        print("needs the MNIST t10k files (set $MNIST_DIR)", file=sys.stderr)
        return 2
    test = load_split(data, "test")
    rng = np.random.default_rng(args.seed)
    reader = PostcodeReader(load_bundle(args.model), ReaderConfig())
    exact = accepted = right = 0
    for _ in range(args.frames):
        picks = rng.integers(0, len(test), 5)
        truth = "".join(str(int(d)) for d in test.labels[picks])
        decision = reader.read_image(plain_frame(test.images[picks], rng)).decision
        exact += decision.postcode == truth
        accepted += decision.accepted
        right += decision.accepted and decision.postcode == truth
    print(f"{args.frames} plain frames from t10k: exact {exact / args.frames:.1%}, "
          f"accepted {accepted / args.frames:.1%}, precision among accepted {right / max(accepted, 1):.2%} "
          f"({accepted - right} wrong)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
