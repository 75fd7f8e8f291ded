"""edge-agent: run the appliance, read postcodes from image files, or make a demo camera.

Thin: parse arguments, load config, build adapters, run. The work is in the modules.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path

import cv2
import numpy as np

from edge_agent.bundle import BundleError
from edge_agent.config import (DEFAULT_BUNDLE, AgentConfig, ConfigError, error_key, load_config, parse_config,
                               security_warnings, state_path_errors)
from edge_agent.decoder import DecodePolicy, MisdirectBudget, misdirect_budget
from edge_agent.logs import setup_logging
from edge_agent.signals import StopSignal, dump_stacks_on
from edge_agent.sortplan import SortPlan, SortPlanError, load_sort_plan

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

    _dump_stacks_on_crash_and_sigusr1()
    with StopSignal() as stop:  # SIGTERM and SIGINT
        try:
            run_agent(config, stop, start_fresh=args.start_fresh)
        except (BundleError, OutboxError, MqttConfigError, FrameError, OSError) as exc:
            # What an operator can fix (model, outbox, folders, settings, background image): one
            # line, no traceback. Anything else is a bug and keeps its traceback.
            log.error("cannot start: %s", exc)
            return 2
    return 0


def _dump_stacks_on_crash_and_sigusr1() -> None:
    """Every thread's stack on stderr (the journal): on `kill -USR1 <pid>`, for an agent that
    hangs, and when native code crashes (SIGSEGV, SIGABRT, ...), so a restart by systemd leaves
    a trace of where it happened instead of a bare exit status."""
    dump_stacks_on(signal.SIGUSR1)
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr is not a file (run in process by a test)
        log.debug("no stack dump on a crash: stderr has no file descriptor")


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
                            policy=DecodePolicy(target_misdirect_rate=args.target_misdirect_rate),
                            budget=_budget(args))
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


def _read_truth(path: Path) -> dict[str, str]:
    """truth.csv: the header ``file,postcode`` and one row per frame (postcodes as text)."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(handle)
        if rows.fieldnames is None or [f.strip() for f in rows.fieldnames] != ["file", "postcode"]:
            raise ValueError(f"{path}: the header must be file,postcode")
        return {row["file"].strip(): row["postcode"].strip() for row in rows}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Read every frame with a truth, decide as the agent would, and report what the decisions cost."""
    setup_logging("WARNING", json_lines=False)
    from edge_agent.evaluation import CostModel, score
    from edge_agent.loader import load_bundle
    from edge_agent.pipeline import PostcodeReader, digit_evidence
    from edge_agent.reader import ReaderConfig

    lengths = tuple(int(n) for n in args.lengths.split(","))
    try:
        truth = _read_truth(args.truth)
        model = load_bundle(args.bundle, num_threads=args.threads)
        plan = load_sort_plan(args.sort_plan, lengths) if args.sort_plan else None
    except (OSError, ValueError, BundleError, SortPlanError) as exc:
        print(f"edge-agent evaluate: {exc}", file=sys.stderr)
        return 2
    reader = PostcodeReader(model, ReaderConfig(expected_lengths=lengths), plan=plan,
                            policy=DecodePolicy(target_misdirect_rate=args.target_misdirect_rate,
                                                invalid_prior=args.invalid_prior),
                            budget=_budget(args))
    evidence, truths, missing, bad = [], [], [], []
    for name, postcode in sorted(truth.items()):
        path = args.frames / name
        if not path.is_file():
            missing.append(name)
            continue
        try:
            evidence.append(digit_evidence(_decode(path), model.classifier, reader.reader_config))
        except ValueError as exc:  # the agent answers such an item bad_frame: it counts, as a review
            bad.append(f"{name}: {exc}")
            evidence.append(None)
        truths.append(postcode)
    if missing:
        print(f"edge-agent evaluate: {len(missing)} frame(s) in the truth file are missing, e.g. {missing[0]}",
              file=sys.stderr)
    if bad:
        print(f"edge-agent evaluate: {len(bad)} frame(s) could not be decoded, counted as reviews (bad_frame), "
              f"e.g. {bad[0]}", file=sys.stderr)
    if not evidence:
        print("edge-agent evaluate: no frames to evaluate", file=sys.stderr)
        return 2
    spent = plan is not None and reader.budget is not None and reader.budget.spends_on(plan)
    if spent and not args.cold:
        # A running agent's bar rests on the mail it read before (kept across restarts): the
        # chute posteriors of these frames are observed once (no truth is used), then decided.
        for read in evidence:
            if read is not None:
                reader.decide(read, plan)
    decisions = [reader.decide(read, plan) if read is not None else _bad_frame_decision() for read in evidence]
    cost = CostModel(keying_seconds=args.keying_seconds, labour_per_hour=args.labour_per_hour,
                     misdirect_cost=args.misdirect_cost)
    report = score(decisions, truths, plan, cost) | {
        "model_version": model.version, "decided_by": "sort_plan" if plan else "digit_threshold",
        "sort_plan": plan.summary() if plan else None,
        "acceptance": _acceptance_in_force(reader.budget, plan) if plan else None,
        "acceptance_setting": args.acceptance if plan else None,
        "start": ("cold" if args.cold else "warm") if spent else None, "bad_frames": len(bad),
        "chute_threshold_last": reader.budget.threshold() if plan and reader.budget else None}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        low, high = report["misdirect_rate_95"]
        print(f"envelopes {report['envelopes']}  model {model.version}  decided by {report['decided_by']}")
        print(f"auto-sorted {report['auto_sort_rate']:.1%}  misdirected {report['misdirects']} "
              f"({report['misdirect_rate']:.3%}, 95% {low:.3%}-{high:.3%})  precision {report['precision']:.3%}")
        print(f"misdirects the accepted reads' posteriors expect: {report['misdirects_expected']:.2f} "
              f"(as many as observed or more by chance: {report['misdirects_by_chance']:.1%})")
        print("review: " + (", ".join(f"{k} {v}" for k, v in report["reviews_by_reason"].items()) or "none"))
        if plan:
            print(f"mail to postcodes not in the plan: {report['invalid_envelopes']}, "
                  f"sorted automatically: {report['invalid_accepted']}; "
                  f"mail to valid postcodes sorted automatically: {report['auto_sort_rate_valid_mail']:.1%}")
        if spent:
            start = (f"strict {reader.budget.strict:.4f} for the first {reader.budget.min_reads} reads, as an agent "
                     "just started without a kept bar" if args.cold else
                     "every read decided against the bar of an agent that has read these frames' posteriors before")
            print(f"chute bar spent over the reads: {reader.budget.threshold():.4f} at the end ({start})")
        print(f"cost per 1,000 envelopes: {report['cost_per_1000']:.2f} "
              f"(keying {args.keying_seconds} s at {args.labour_per_hour}/h, misdirect {args.misdirect_cost})")
    return 0


def _acceptance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--acceptance", choices=("auto", "per_item", "spent"), default="auto",
                        help="with --sort-plan, as the agent's sort_plan.acceptance: 'spent' sets the chute bar "
                             "from the reads so far (strict until a quarter of --spent-window are known), "
                             "'per_item' holds every item to 1 - target, 'auto' spends only over a plan "
                             "with at most 10%% of its codes valid (default %(default)s)")
    parser.add_argument("--spent-window", type=int, default=2000)


def _bad_frame_decision():
    """An item whose frame cannot be decoded: the agent answers it bad_frame, a review."""
    from edge_agent.decision import Decision
    from edge_agent.types import Reason

    return Decision(postcode="", accepted=False, confidence=0.0, digits=(), reason=Reason.BAD_FRAME)


def _acceptance_in_force(budget: MisdirectBudget | None, plan: SortPlan) -> str:
    """"spent" or "per_item": the bar the plan's reads were held to under the --acceptance setting."""
    return "spent" if budget is not None and budget.spends_on(plan) else "per_item"


def _budget(args: argparse.Namespace) -> MisdirectBudget | None:
    return misdirect_budget(args.acceptance, args.target_misdirect_rate, args.spent_window)


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
    predict.add_argument("--target-misdirect-rate", type=float, default=1e-3,
                         help="with --sort-plan: at most this share of the sorted mail to a wrong chute "
                              "(default %(default)s)")
    _acceptance_arguments(predict)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="auto-sort rate, misdirects and cost of decisions on labelled frames")
    evaluate.add_argument("frames", type=Path, help="folder of frames")
    evaluate.add_argument("--truth", type=Path, required=True, help="CSV file,postcode (one row per frame)")
    evaluate.add_argument("--sort-plan", type=Path, help="CSV postcode,chute: decide on the chute posterior")
    evaluate.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    evaluate.add_argument("--lengths", default="5")
    evaluate.add_argument("--threads", type=int, default=1)
    evaluate.add_argument("--target-misdirect-rate", type=float, default=1e-3)
    evaluate.add_argument("--invalid-prior", type=float, default=DecodePolicy.invalid_prior,
                          help="share of mail addressed to codes the plan does not have (sort_plan.invalid_prior)")
    _acceptance_arguments(evaluate)
    evaluate.add_argument("--cold", action="store_true",
                          help="with a spent bar, decide as an agent just started with no bar kept: strict until a "
                               "quarter of --spent-window reads are known (default: as a running agent, whose bar "
                               "rests on the posteriors of mail it read before; here these frames', not the truth)")
    evaluate.add_argument("--keying-seconds", type=float, default=2.25, help="manual keying per review (s)")
    evaluate.add_argument("--labour-per-hour", type=float, default=30.0, help="keying cost per hour")
    evaluate.add_argument("--misdirect-cost", type=float, default=1.50, help="cost of one misdirected envelope")
    evaluate.add_argument("--json", action="store_true", help="the report as JSON")
    evaluate.set_defaults(func=cmd_evaluate)

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
