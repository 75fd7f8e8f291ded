"""edge-sync: keygen, add-selftest, publish, resign (build side); pull, status, rollback (site side)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from edge_agent.logs import setup_logging
from sync.errors import SyncError
from sync.fetch import HttpSettings

log = logging.getLogger("sync")

# Tests (only) make a pull stop at a step so it can be killed there; see tests/test_sync_crash.py.
PAUSE_ENV = "EDGE_SYNC_TEST_PAUSE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-sync", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair (private key 0600)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("publish", help="add a bundle to a registry folder, point a channel at it, sign")
    p.add_argument("bundle", type=Path)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--valid-days", type=float, default=30.0, help="index expiry (default 30 days)")

    p = sub.add_parser("resign", help="re-sign the index with a fresh expiry (run well within --valid-days)")
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--valid-days", type=float, default=30.0)

    p = sub.add_parser("add-selftest", help="put labelled digits in a bundle and record its accuracy")
    p.add_argument("bundle", type=Path)
    p.add_argument("--digits", type=Path, required=True)

    p = sub.add_parser("pull", help="fetch, verify, validate and activate the channel's version")
    p.add_argument("--registry", required=True, help="base URL of the registry")
    p.add_argument("--public-key", type=Path, action="append", required=True,
                   help="a pinned public key; repeat to trust several during a key rotation")
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--channel", default="stable")
    p.add_argument("--pin", help="install exactly this version (the only way to downgrade)")
    p.add_argument("--max-bytes", type=int, default=HttpSettings.max_bytes)
    p.add_argument("--timeout", type=float, default=HttpSettings.timeout, help="per connect / read (s)")
    p.add_argument("--transfer-timeout", type=float, default=HttpSettings.transfer_timeout,
                   help="per file attempt (s); the next attempt resumes")
    p.add_argument("--retries", type=int, default=HttpSettings.retries)
    p.add_argument("--backoff", type=float, default=HttpSettings.backoff)
    p.add_argument("--keep", type=int, default=3, help="previous versions kept on disk")
    p.add_argument("--tolerance", type=float, default=0.01, help="self-test accuracy tolerance")
    p.add_argument("--every", type=float, help="keep pulling every SECONDS")
    p.add_argument("--mqtt", metavar="HOST:PORT",
                   help="publish step events and the sync state there, and health-check an activation")
    p.add_argument("--site", help="site id (topics <prefix>/<site>/<line>/...); needed with --mqtt")
    p.add_argument("--line", help="line id; needed with --mqtt")
    p.add_argument("--topic-prefix", default="postcode")
    p.add_argument("--health-timeout", type=float, default=60.0,
                   help="seconds for the agent to report the new version and healthy reads, else roll back")
    p.add_argument("--max-review-pct", type=float, default=90.0,
                   help="highest share of reads sent to review that counts as healthy")
    p.add_argument("--min-reads", type=int, default=5, help="reads on the new version needed to judge it")

    p = sub.add_parser("status", help="active, previous, staged, high-water mark, failures (JSON)")
    p.add_argument("--models-dir", type=Path, required=True)

    p = sub.add_parser("rollback", help="switch active back to the previous version")
    p.add_argument("--models-dir", type=Path, required=True)
    return parser


def _pause_hook():
    step = os.environ.get(PAUSE_ENV)
    if not step:
        return lambda name: None

    def pause(name: str) -> None:
        if name == step:
            print(f"paused at {name}", file=sys.stderr, flush=True)
            time.sleep(3600)
    return pause


def _run_pull(args) -> int:
    from sync.pull import PullSettings, pull
    from sync.signing import load_public_key

    keys = [load_public_key(path) for path in args.public_key]
    settings = PullSettings(
        registry_url=args.registry, public_keys=keys, models_dir=args.models_dir, channel=args.channel,
        pin=args.pin, keep=args.keep, tolerance=args.tolerance,
        http=HttpSettings(timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                          max_bytes=args.max_bytes, transfer_timeout=args.transfer_timeout))

    mqtt = _connect_mqtt(args)

    def report(event: dict) -> None:
        log.info(json.dumps(event, sort_keys=True))
        if mqtt is not None:
            mqtt.event(event)

    pause = _pause_hook()
    try:
        while True:
            result = pull(settings, report=report, pause=pause)
            ok = result.ok
            if result.outcome == "updated" and mqtt is not None:
                ok = _health_check(args, mqtt, result.version, report)
            elif result.ok:
                print(f"{result.outcome}: {result.version}")
            else:
                print(f"refused: {result.reason}", file=sys.stderr)
            if mqtt is not None:
                mqtt.state(_sync_state(args.models_dir))
            if not args.every:
                return 0 if ok else 1
            time.sleep(args.every)
    finally:
        if mqtt is not None:
            mqtt.close()


def _connect_mqtt(args):
    """The MQTT reporter, or None (no --mqtt, or the broker cannot be reached: one warning)."""
    if not args.mqtt:
        return None
    if not args.site or not args.line:
        raise SyncError("--mqtt needs --site and --line")
    from sync.mqtt_report import SyncMqtt, parse_hostport

    try:
        host, port = parse_hostport(args.mqtt)
    except ValueError:
        raise SyncError(f"--mqtt {args.mqtt!r}: expected HOST:PORT") from None
    mqtt = SyncMqtt(host, port, args.site, args.line, prefix=args.topic_prefix)
    return mqtt if mqtt.connect() else None


def _sync_state(models_dir: Path) -> dict:
    from sync.pull import status

    state = status(models_dir)
    return {key: state.get(key) for key in ("active", "previous", "last_result", "last_error")}


def _health_check(args, mqtt, version: str, report) -> bool:
    """After an activation: healthy in time, or roll back (version marked failed) and say why."""
    import fcntl

    from sync.activation import load_state, rollback, save_state
    from sync.mqtt_report import HealthCriteria
    from sync.registry import iso

    criteria = HealthCriteria(timeout_s=args.health_timeout, min_reads=args.min_reads,
                              max_review_pct=args.max_review_pct)
    report({"event": "health_check", "version": version, "timeout_s": criteria.timeout_s,
            "min_reads": criteria.min_reads, "max_review_pct": criteria.max_review_pct})
    verdict = mqtt.wait_healthy(version, criteria)
    if verdict.healthy:
        report({"event": "healthy", "version": version, "reads": verdict.reads, "review_pct": verdict.review_pct})
        print(f"updated: {version}")
        return True
    if not verdict.judged:
        # A broker outage says nothing about the model: keep it, do not mark it failed.
        log.warning(verdict.reason)
        report({"event": "health_unknown", "version": version, "reason": verdict.reason})
        print(f"updated: {version}")
        return True
    reason = f"unhealthy: {verdict.reason}"
    with open(Path(args.models_dir) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not while another pull is switching
        try:
            _, previous = rollback(args.models_dir, reason=reason)
        except SyncError as exc:
            report({"event": "rollback_failed", "version": version, "reason": f"{reason}; {exc}"})
            print(f"refused: v{version} unhealthy and not rolled back: {verdict.reason}; {exc}", file=sys.stderr)
            return False
        state = load_state(args.models_dir)
        from datetime import datetime, timezone

        state["last_error"] = reason
        state["last_result"] = {"outcome": "rolled_back", "version": version, "reason": reason,
                                "at": iso(datetime.now(timezone.utc))}
        save_state(args.models_dir, state)
    report({"event": "rolled_back", "version": version, "to": previous, "reason": reason,
            "reads": verdict.reads, "review_pct": verdict.review_pct})
    print(f"refused: v{version} rolled back: {verdict.reason}", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "keygen":
            from sync.signing import generate_keypair

            private, public = generate_keypair(args.out)
            print(f"private key {private} (keep it off site hardware), public key {public}")
        elif args.command == "publish":
            from datetime import timedelta

            from sync.registry import publish
            from sync.signing import load_private_key

            version = publish(args.bundle, args.registry, args.channel, load_private_key(args.key),
                              validity=timedelta(days=args.valid_days))
            print(f"published {version} on {args.channel}")
        elif args.command == "resign":
            from datetime import timedelta

            from sync.registry import resign
            from sync.signing import load_private_key

            expires = resign(args.registry, load_private_key(args.key), validity=timedelta(days=args.valid_days))
            print(f"index re-signed, expires {expires}")
        elif args.command == "add-selftest":
            from sync.selftest import add_selftest

            entry = add_selftest(args.bundle, args.digits)
            print(f"self-test: {entry['n']} digits, accuracy {entry['accuracy']}")
        elif args.command == "pull":
            return _run_pull(args)
        elif args.command == "status":
            from sync.pull import status

            print(json.dumps(status(args.models_dir), indent=2, sort_keys=True))
        elif args.command == "rollback":
            from sync.activation import rollback

            current, previous = rollback(args.models_dir)
            print(f"rolled back: {current} -> {previous}")
    except SyncError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
