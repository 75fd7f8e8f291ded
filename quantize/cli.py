"""edge-quantize: int8 bundle from a trained model; exits non-zero when the accuracy gate refuses it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.bundle import BundleError
from edge_agent.mnist import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-quantize", description=__doc__)
    parser.add_argument("--train-dir", type=Path, action="append", dest="train_dirs",
                        help="folder with model.keras and metrics.json from edge-train (default build/train); "
                             "repeat it to merge members into one ensemble graph (their logits averaged)")
    parser.add_argument("--from-bundle", type=Path,
                        help="re-calibrate this bundle's model.tflite (bytes unchanged) instead of converting")
    parser.add_argument("--figures", type=Path, help="write reliability diagrams (PNG) into this folder")
    parser.add_argument("--out", type=Path, default=Path("models/mnist-int8"), help="bundle folder")
    parser.add_argument("--data", type=Path, help="folder with MNIST IDX files or mnist.npz")
    parser.add_argument("--version", help="semantic version; default: next minor of the bundle in --out")
    parser.add_argument("--max-drop-pp", type=float, default=0.5,
                        help="refuse when int8 is this many points below float")
    parser.add_argument("--target-precision", type=float, default=0.999)
    parser.add_argument("--reader-crop-copies", type=int, default=0,
                        help="fit the temperature and threshold on the reader's crops of this many renderings "
                             "of each validation digit (0: on the digits and augmented copies)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from quantize.build import QuantizeConfig, build_bundle  # deferred: TensorFlow import is slow
    from quantize.gate import GateError

    if args.train_dirs and args.from_bundle:
        parser.error("--train-dir and --from-bundle exclude each other")
    train_dirs = () if args.from_bundle else tuple(args.train_dirs or [Path("build/train")])
    config = QuantizeConfig(
        train_dirs=train_dirs, from_bundle=args.from_bundle, out_dir=args.out, data_dir=args.data,
        version=args.version, max_drop_pp=args.max_drop_pp, target_precision=args.target_precision,
        eval_limit=args.eval_limit, figures_dir=args.figures, reader_crop_copies=args.reader_crop_copies,
    )
    try:
        manifest = build_bundle(config)
    except (GateError, BundleError, DataError, FileNotFoundError) as exc:
        print(f"edge-quantize: refused: {exc}", file=sys.stderr)
        return 1
    m = manifest["metrics"]
    print(f"{manifest['name']} {manifest['version']}: int8 {m['int8_accuracy']:.4f}, "
          f"float {m['float_accuracy']:.4f} on {m['dataset']}; "
          f"temperature {manifest['calibration']['temperature']:.3f}, "
          f"threshold {manifest['acceptance_threshold']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
