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
    p.add_argument("--config", type=Path,
                   help="an agent's TOML config, or a folder of them (one per line): each line's [sync] "
                        "section, models folder and MQTT login; instead of the flags below")
    p.add_argument("--registry", help="base URL of the registry")
    p.add_argument("--public-key", type=Path, action="append",
                   help="a pinned public key; repeat to trust several during a key rotation")
    p.add_argument("--models-dir", type=Path)
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

    p = sub.add_parser("adopt", help="activate a local bundle (default: the one shipped with the package) "
                                     "on lines with no active model yet; nothing otherwise")
    p.add_argument("bundle", type=Path, nargs="?", help="bundle folder (default: the shipped bundle)")
    p.add_argument("--config", type=Path, help="an agent's TOML config or a folder of them")
    p.add_argument("--models-dir", type=Path, help="the models folder, instead of --config")
    p.add_argument("--tolerance", type=float, default=0.01, help="self-test accuracy tolerance")

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


def _jobs(args):
    """One job per line to sync: from --config (the agents' own TOML) or from the flags."""
    from sync.lines import Job, MqttTarget, line_jobs
    from edge_agent.address import parse_host_port
    from sync.mqtt_report import HealthCriteria
    from sync.pull import PullSettings
    from sync.signing import load_public_key

    http = HttpSettings(timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                        max_bytes=args.max_bytes, transfer_timeout=args.transfer_timeout)
    if args.config is not None:
        jobs, skipped = line_jobs(args.config, http, args.tolerance)
        for note in skipped:
            log.info(note)
        return jobs
    missing = [flag for flag, value in (("--registry", args.registry), ("--public-key", args.public_key),
                                        ("--models-dir", args.models_dir)) if not value]
    if missing:
        raise SyncError(f"pull needs --config, or {', '.join(missing)}")
    settings = PullSettings(
        registry_url=args.registry, public_keys=[load_public_key(path) for path in args.public_key],
        models_dir=args.models_dir, channel=args.channel, pin=args.pin, keep=args.keep, tolerance=args.tolerance,
        http=http)
    mqtt = None
    if args.mqtt:
        if not args.site or not args.line:
            raise SyncError("--mqtt needs --site and --line")
        try:
            host, port = parse_host_port(args.mqtt)
        except ValueError as exc:
            raise SyncError(f"--mqtt: {exc}") from None
        mqtt = MqttTarget(host, port, args.site, args.line, prefix=args.topic_prefix)
    health = HealthCriteria(timeout_s=args.health_timeout, min_reads=args.min_reads,
                            max_review_pct=args.max_review_pct)
    return [Job(str(args.models_dir), settings, mqtt, health)]


def _run_pull(args) -> int:
    jobs = _jobs(args)
    if not jobs:
        print("up_to_date: no line is configured to sync")
        return 0
    pause = _pause_hook()
    while True:
        results = [_pull_line(job, pause, prefix=len(jobs) > 1) for job in jobs]
        if not args.every:
            return 0 if all(results) else 1
        time.sleep(args.every)


def _pull_line(job, pause, prefix: bool) -> bool:
    """Pull for one line, health-check an update, publish the state; True unless something was refused."""
    from sync.pull import pull

    mqtt = _connect_mqtt(job.mqtt)
    label = f"{job.name}: " if prefix else ""

    def report(event: dict) -> None:
        event = {**event, "line": job.name} if prefix else event
        log.info(json.dumps(event, sort_keys=True))
        if mqtt is not None:
            mqtt.event(event)

    try:
        pending = _pending_health_check(job.settings.models_dir)
        if pending is not None and mqtt is not None:
            # A pull killed during its health check left a version active that nobody judged.
            report({"event": "health_check_resumed", "version": pending})
            if not _health_check(job, mqtt, pending, report, label):
                mqtt.state(_sync_state(job.settings.models_dir) | {"channel": job.settings.channel})
                return False
        result = pull(job.settings, report=report, pause=pause)
        ok = result.ok
        if result.outcome == "updated" and mqtt is not None:
            ok = _health_check(job, mqtt, result.version, report, label)
        elif result.ok:
            print(f"{label}{result.outcome}: {result.version}")
        else:
            print(f"{label}refused: {result.reason}", file=sys.stderr)
        if mqtt is not None:
            mqtt.state(_sync_state(job.settings.models_dir) | {"channel": job.settings.channel})
        return ok
    finally:
        if mqtt is not None:
            mqtt.close()


def _connect_mqtt(target):
    """The MQTT reporter, or None (none configured, or the broker cannot be reached: one warning)."""
    if target is None:
        return None
    from sync.mqtt_report import SyncMqtt

    mqtt = SyncMqtt(target.host, target.port, target.site, target.line, prefix=target.prefix,
                    username=target.username, password=target.password, tls=target.tls, ca_file=target.ca_file)
    return mqtt if mqtt.connect() else None


def _run_adopt(args) -> int:
    from edge_agent.config import DEFAULT_BUNDLE
    from sync.lines import config_files, load_line
    from sync.pull import adopt

    if args.config is not None:
        folders = [(str(f), load_line(f).model.bundle.parent) for f in config_files(args.config)]
    elif args.models_dir is not None:
        folders = [(str(args.models_dir), args.models_dir)]
    else:
        raise SyncError("adopt needs --config or --models-dir")
    bundle = args.bundle or DEFAULT_BUNDLE
    for name, models_dir in folders:
        result = adopt(models_dir, bundle, args.tolerance,
                       report=lambda event: log.info(json.dumps(event, sort_keys=True)))
        print(f"{name}: " + (f"adopted {result.version}" if result.outcome == "updated"
                             else f"already active: {result.version}"))
    return 0


def _sync_state(models_dir: Path) -> dict:
    from sync.pull import status

    state = status(models_dir)
    return {key: state.get(key) for key in ("active", "previous", "last_result", "last_error")}


def _pending_health_check(models_dir: Path) -> str | None:
    """The active version whose health check was started and never finished, if any."""
    from sync.activation import active_version, load_state

    pending = load_state(models_dir).get("health_pending")
    return pending if pending and pending == active_version(models_dir) else None


def _set_health_pending(models_dir: Path, version: str | None) -> None:
    from sync.activation import load_state, save_state

    state = load_state(models_dir)
    if state.get("health_pending") != version:
        state["health_pending"] = version
        save_state(models_dir, state)


def _health_check(job, mqtt, version: str, report, label: str = "") -> bool:
    """After an activation: healthy in time, or roll back (version marked failed) and say why.

    Marked pending in the models folder's state while it runs, so a kill during the check is
    resumed by the next pull instead of leaving an unjudged version active for good.
    """
    import fcntl

    from sync.activation import load_state, rollback, save_state
    from sync.registry import iso

    criteria = job.health
    models_dir = Path(job.settings.models_dir)
    _set_health_pending(models_dir, version)
    report({"event": "health_check", "version": version, "timeout_s": criteria.timeout_s,
            "min_reads": criteria.min_reads, "max_review_pct": criteria.max_review_pct})
    verdict = mqtt.wait_healthy(version, criteria)
    if verdict.healthy or not verdict.judged:
        _set_health_pending(models_dir, None)
    if verdict.healthy:
        report({"event": "healthy", "version": version, "reads": verdict.reads, "review_pct": verdict.review_pct})
        print(f"{label}updated: {version}")
        return True
    if not verdict.judged:
        # A broker outage says nothing about the model: keep it, do not mark it failed.
        log.warning(verdict.reason)
        report({"event": "health_unknown", "version": version, "reason": verdict.reason})
        print(f"{label}updated: {version}")
        return True
    reason = f"unhealthy: {verdict.reason}"
    with open(models_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not while another pull is switching
        try:
            _, previous = rollback(models_dir, reason=reason)
        except SyncError as exc:
            report({"event": "rollback_failed", "version": version, "reason": f"{reason}; {exc}"})
            print(f"{label}refused: v{version} unhealthy and not rolled back: {verdict.reason}; {exc}",
                  file=sys.stderr)
            return False
        state = load_state(models_dir)
        from datetime import datetime, timezone

        state["health_pending"] = None
        state["last_error"] = reason
        state["last_result"] = {"outcome": "rolled_back", "version": version, "reason": reason,
                                "at": iso(datetime.now(timezone.utc))}
        save_state(models_dir, state)
    report({"event": "rolled_back", "version": version, "to": previous, "reason": reason,
            "reads": verdict.reads, "review_pct": verdict.review_pct})
    print(f"{label}refused: v{version} rolled back: {verdict.reason}", file=sys.stderr)
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
        elif args.command == "adopt":
            return _run_adopt(args)
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
