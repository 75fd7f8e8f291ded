"""The brief's kind of server, for comparison only: Flask + Keras, one POST carries a batch of digits.

    python benchmarks/brief_server.py --model build/bench/models/keras-full/model.keras --port 8500

``POST /predict`` with ``{"instances": [[[0..255]*28]*28, ...]}`` (28x28 pixel rows, white on
black, as MNIST stores them) answers ``{"predictions": [...], "confidences": [...]}`` from one
``model.predict`` on the whole batch, as the original brief's API did; ``GET /health`` answers
"ok" once the model is loaded. Served by waitress (or Flask's own server) on loopback. This
is the design the appliance replaced, kept runnable so section 7 of ``benchmarks/bench.py``
can time the brief's own test against it; it imports TensorFlow, the appliance never does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request

log = logging.getLogger(__name__)


def create_app(model) -> Flask:
    """A Flask app that classifies a batch of 28x28 digits per request with ``model.predict``."""
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return "ok"

    @app.post("/predict")
    def predict():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "instances" not in body:
            return jsonify(error='expected {"instances": [28x28 pixel arrays]}'), 400
        try:
            pixels = np.asarray(body["instances"], dtype=np.float32)
            batch = pixels.reshape(len(pixels), 28, 28, 1) / 255.0
        except (TypeError, ValueError):
            return jsonify(error="each instance must be 28x28 numbers 0-255"), 400
        probabilities = model.predict(batch, verbose=0)
        return jsonify(predictions=probabilities.argmax(axis=1).tolist(),
                       confidences=[round(float(p), 6) for p in probabilities.max(axis=1)])

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brief_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Keras model.keras (softmax output)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--server", choices=("waitress", "flask"), default="waitress")
    parser.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import keras  # deferred: --help without TensorFlow

    model = keras.models.load_model(args.model)
    app = create_app(model)
    log.info("serving %s on http://%s:%d/predict with %s", args.model, args.host, args.port, args.server)
    if args.server == "waitress":
        from waitress import serve

        serve(app, host=args.host, port=args.port, threads=args.threads, max_request_body_size=64 * 2**20)
    else:
        app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
