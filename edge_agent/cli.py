"""edge-agent: run the appliance, read postcodes from image files, or make a demo camera.

Thin: parse arguments, load config, build adapters, run. The work is in the modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import cv2
import numpy as np

from edge_agent.bundle import BundleError
from edge_agent.config import (DEFAULT_BUNDLE, AgentConfig, ConfigError, error_key, load_config, parse_config,
                               security_warnings, state_path_errors)
from edge_agent.decoder import DecodePolicy
from edge_agent.logs import setup_logging
from edge_agent.sortplan import SortPlanError, load_sort_plan

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
MAX_IMAGE_BYTES = 64 * 1024 * 1024

log = logging.getLogger("edge_agent")


def _report_config_errors(errors: list[str]) -> int:
    for line in errors:
        print(f"config error: {line}", file=sys.stderr)
    return 2


def validate_config(path: Path | None) -> int:
    """Every problem ``run`` would meet before serving, one line each; nothing is created."""
    from edge_agent.loader import load_bundle  # deferred: pulls in the LiteRT runtime

    try:
        config: AgentConfig | None = load_config(path) if path else parse_config({})
        errors: list[str] = []
    except ConfigError as exc:
        config, errors = exc.config, list(exc.errors)
    if config is not None:
        errors += state_path_errors(config)
        # A missing bundle or an impossible thread count already has its line; loading it would
        # only repeat that (or start a thousand threads).
        if not {"model.bundle", "model.num_threads"} & {error_key(line) for line in errors}:
            try:
                load_bundle(config.model.bundle, num_threads=config.model.num_threads)  # as run does
            except (BundleError, OSError) as exc:
                errors.append(f"model.bundle: {exc}")
        if config.sort_plan.path is not None and "sort_plan.path" not in {error_key(e) for e in errors}:
            try:
                load_sort_plan(config.sort_plan.path, config.reader.postcode_lengths)
            except SortPlanError as exc:
                errors += [f"sort_plan.path: {line}" for line in exc.errors]
        for warning in security_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
    if errors:
        return _report_config_errors(errors)
    print(f"{path if path else 'built-in defaults'}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # Before anything is created: the outbox, its -wal/-shm files and review crops are
    # readable by the service's user only.
    os.umask(0o077)
    if args.validate_config:
        return validate_config(args.config)
    try:
        config = load_config(args.config) if args.config else parse_config({})
    except ConfigError as exc:
        return _report_config_errors(exc.errors)
    state_errors = state_path_errors(config)
    if state_errors:
        return _report_config_errors(state_errors)
    setup_logging(config.logging.level, config.logging.json)
    from edge_agent.agent import run_agent  # deferred: pulls in paho, OpenCV threads
    from edge_agent.mqtt import MqttConfigError
    from edge_agent.outbox import OutboxError
    from edge_agent.sources import FrameError

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_agent(config, stop, start_fresh=args.start_fresh)
    except (BundleError, OutboxError, MqttConfigError, FrameError, OSError) as exc:
        # What an operator can fix (model, outbox, folders, settings, background image): one
        # line, no traceback. Anything else is a bug and keeps its traceback.
        log.error("cannot start: %s", exc)
        return 2
    return 0


def _image_paths(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def _decode(path: Path) -> np.ndarray:
    """Decode one image file, with a clear message for everything that can be wrong with it."""
    if not path.is_file():
        raise ValueError("no such file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file")
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"file of {size} bytes is larger than {MAX_IMAGE_BYTES}")
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ValueError("not a decodable image (corrupt or unsupported format)")
    return image


def cmd_predict(args: argparse.Namespace) -> int:
    setup_logging("WARNING", json_lines=False)
    from edge_agent.loader import load_bundle
    from edge_agent.pipeline import PostcodeReader
    from edge_agent.reader import ReaderConfig

    try:
        model = load_bundle(args.bundle, num_threads=args.threads)
    except BundleError as exc:
        print(f"edge-agent predict: {exc}", file=sys.stderr)
        return 2
    lengths = tuple(int(n) for n in args.lengths.split(","))
    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
    plan = None
    if args.sort_plan is not None:
        try:
            plan = load_sort_plan(args.sort_plan, lengths)
        except SortPlanError as exc:
            for line in exc.errors:
                print(f"edge-agent predict: {line}", file=sys.stderr)
            return 2
    reader = PostcodeReader(model, ReaderConfig(roi=roi, expected_lengths=lengths), plan=plan,
                            policy=DecodePolicy(target_misdirect_rate=args.target_misdirect_rate))
    failures = 0
    for path in _image_paths(args.images):
        try:
            read = reader.read_image(_decode(path))
        except (ValueError, OSError) as exc:
            failures += 1
            print(json.dumps({"source": str(path), "error": str(exc), "postcode": "", "accepted": False,
                              "confidence": 0.0, "reason": "bad_frame", "digits": []}), flush=True)
            continue
        d = read.decision
        print(json.dumps({
            "source": str(path), "postcode": d.postcode, "accepted": d.accepted,
            "confidence": round(d.confidence, 5), "reason": d.reason.value if d.reason else None,
            "digits": [{"digit": x.digit, "confidence": round(x.confidence, 5)} for x in d.digits],
            **d.plan_fields(),
        }), flush=True)
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import render_demo_camera

    written = render_demo_camera(args.out, args.frames, args.seed, video=args.video, mnist_dir=args.mnist)
    print(f"wrote {written} (postcodes in {args.out / 'truth.json'})")
    return 0


def cmd_demo_run(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo

    return run_demo(args.workdir, items=args.items, burst=args.burst, seed=args.seed, broker_kind=args.broker,
                    duration_s=args.duration, web_port=args.web_port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 30 * 86_400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 30 days of seconds")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the appliance service")
    run.add_argument("--config", type=Path, help="TOML configuration (defaults for every key)")
    run.add_argument("--validate-config", action="store_true",
                     help="check the config, the model bundle and the state folders, then exit")
    run.add_argument("--start-fresh", action="store_true",
                     help="start with a new, empty outbox even though a previous run left state; pending "
                          "results and the audit trail of that run are NOT delivered")
    run.set_defaults(func=cmd_run)

    predict = sub.add_parser("predict", help="read postcodes from image files; one JSON line each")
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    predict.add_argument("--lengths", default="5", help="allowed postcode lengths, e.g. 5 or 5,6")
    predict.add_argument("--roi", help="x,y,w,h of the postcode field")
    predict.add_argument("--threads", type=int, default=1)
    predict.add_argument("--sort-plan", type=Path, help="CSV postcode,chute: decide on the chute posterior "
                                                         "over the site's valid postcodes")
    predict.add_argument("--target-misdirect-rate", type=float, default=1e-4,
                         help="with --sort-plan: sort a chute only at posterior >= 1 - this (default %(default)s)")
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="render a demo camera: postcode frames from MNIST digits")
    demo.add_argument("--out", type=Path, default=Path("demo-out/camera"))
    demo.add_argument("--frames", type=int, default=40)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--video", action="store_true", help="write camera.avi instead of PNG frames")
    demo.add_argument("--mnist", type=Path, help="MNIST folder to draw training digits from "
                      "(default: the 300 digits shipped with the agent)")
    demo.set_defaults(func=cmd_demo)

    demo_run = sub.add_parser("demo-run", help="the whole appliance: broker, agent, dashboard, simulated PLC; "
                                                "runs until Ctrl-C or --duration")
    demo_run.add_argument("--workdir", type=Path, default=Path("demo-out"))
    demo_run.add_argument("--items", type=int, default=20)
    demo_run.add_argument("--burst", type=int, default=500)
    demo_run.add_argument("--seed", type=int, default=7)
    demo_run.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                          help="auto: Mosquitto when installed, else the embedded amqtt")
    demo_run.add_argument("--duration", type=_seconds, metavar="SECONDS",
                          help="end by itself this many seconds after the start (the PLC's 20 envelopes and "
                               "the burst always complete); default: run until Ctrl-C")
    demo_run.add_argument("--web-port", type=_port, metavar="PORT",
                          help="port of the dashboard on 127.0.0.1 (default 8080, or a free one if 8080 is taken)")
    demo_run.set_defaults(func=cmd_demo_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
