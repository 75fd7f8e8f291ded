"""edge-train: train the MNIST CNN and write model.keras + metrics.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.mnist import DataError

# Spelled out so --help works without importing TensorFlow; a test keeps it equal to training.model's.
ARCHITECTURE_NAMES = ("mnist_cnn", "bn_cnn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-train", description=__doc__)
    parser.add_argument("--data", type=Path, help="folder with MNIST IDX files or mnist.npz")
    parser.add_argument("--out", type=Path, default=Path("build/train"), help="output folder")
    parser.add_argument("--seed", type=int, default=1234, help="weights, augmentation and shuffling")
    parser.add_argument("--split-seed", type=int,
                        help="seed of the validation hold-out (default: --seed); ensemble members share it")
    parser.add_argument("--architecture", default="mnist_cnn", choices=sorted(ARCHITECTURE_NAMES),
                        help="mnist_cnn: the data scientist's reference CNN; bn_cnn: the batch-norm candidate")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's (initial) learning rate")
    parser.add_argument("--lr-schedule", choices=("plateau", "cosine"), default="plateau",
                        help="plateau: halve on a validation-loss plateau; cosine: decay over --epochs")
    parser.add_argument("--validation-per-class", type=int, default=100)
    parser.add_argument("--elastic-copies", type=int, default=4,
                        help="elastic-distorted copies of each training image")
    parser.add_argument("--reader-copies", type=int, default=0,
                        help="crops the reader cuts from rendered frames of each training image (and validation)")
    parser.add_argument("--patience", type=int, default=8, help="early-stopping patience (epochs)")
    parser.add_argument("--limit", type=int, help="train on a random slice of N training images (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from training.train import TrainConfig, train  # deferred: TensorFlow import is slow

    config = TrainConfig(
        out_dir=args.out, data_dir=args.data, seed=args.seed, split_seed=args.split_seed,
        architecture=args.architecture, epochs=args.epochs, lr_schedule=args.lr_schedule,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size, validation_per_class=args.validation_per_class,
        elastic_copies=args.elastic_copies, reader_copies=args.reader_copies, patience=args.patience, limit=args.limit,
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
