"""edge-train: train the MNIST CNN and write model.keras + metrics.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.mnist import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-train", description=__doc__)
    parser.add_argument("--data", type=Path, help="folder with MNIST IDX files or mnist.npz")
    parser.add_argument("--out", type=Path, default=Path("build/train"), help="output folder")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--validation-per-class", type=int, default=100)
    parser.add_argument("--elastic-copies", type=int, default=4,
                        help="elastic-distorted copies of each training image")
    parser.add_argument("--patience", type=int, default=8, help="early-stopping patience (epochs)")
    parser.add_argument("--limit", type=int, help="train on a random slice of N training images (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.train import TrainConfig, train  # deferred: TensorFlow import is slow

    config = TrainConfig(
        out_dir=args.out, data_dir=args.data, seed=args.seed, epochs=args.epochs,
        batch_size=args.batch_size, validation_per_class=args.validation_per_class,
        elastic_copies=args.elastic_copies, patience=args.patience, limit=args.limit,
    )
    try:
        metrics = train(config)
    except DataError as exc:
        print(f"edge-train: {exc}", file=sys.stderr)
        return 2
    print(f"validation accuracy {metrics['validation']['accuracy']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
