"""edge-web: the local site dashboard, served by waitress, fed by the site broker.

Thin: parse arguments, build the state, the MQTT source and the app, serve.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from edge_agent.logs import setup_logging  # tiny shared utilities: JSON lines like the agent's,
from edge_agent.sdnotify import Notifier  # and systemd's notify protocol
from edge_agent.signals import StopSignal  # and a stop request a signal cannot deadlock
from web.config import (BrokerSettings, WebConfig, WebConfigError, check_names, parse_broker_address,
                        read_password)

log = logging.getLogger("web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-web", description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="127.0.0.1:1883", help="site broker as HOST:PORT (default %(default)s)")
    parser.add_argument("--site", required=True, help="site id, as in the agents' topics <prefix>/<site>/<line>/...")
    parser.add_argument("--topic-prefix", default="postcode", help="topic prefix (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve the page on (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve the page on (default %(default)s)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", type=Path, help="file holding the broker password")
    parser.add_argument("--tls", action="store_true", help="connect to the broker with TLS")
    parser.add_argument("--ca-file", type=Path, help="CA certificate for the broker's TLS certificate")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--plain-logs", action="store_true", help="plain text logs instead of JSON lines")
    return parser


def config_from_args(args: argparse.Namespace) -> WebConfig:
    host, port = parse_broker_address(args.broker)
    check_names(args.site, args.topic_prefix)
    if not 1 <= args.port <= 65535:
        raise WebConfigError(f"--port: {args.port} is not between 1 and 65535")
    if args.password_file and not args.username:
        raise WebConfigError("--password-file needs --username")
    if args.ca_file and not args.tls:
        raise WebConfigError("--ca-file needs --tls")
    password = read_password(args.password_file) if args.password_file else os.environ.get("EDGE_WEB_MQTT_PASSWORD")
    broker = BrokerSettings(host=host, port=port, site=args.site, topic_prefix=args.topic_prefix,
                            username=args.username, password=password if args.username else None,
                            tls=args.tls, ca_file=args.ca_file)
    return WebConfig(broker=broker, host=args.host, port=args.port, log_level=args.log_level)


def serve(config: WebConfig, stop: threading.Event | StopSignal) -> None:
    """Subscribe, serve the page until ``stop`` is set, then close both."""
    from web.app import create_app
    from web.mqtt_source import MqttSource
    from web.server import DashboardServer
    from web.state import SiteState

    state = SiteState(config.broker.site, broker=config.broker.address)
    source = MqttSource(state, config.broker)
    server = DashboardServer(create_app(state), config.host, config.port, config.threads)  # binds now
    source.start()
    server.start()
    log.info("edge-web serving site %s on %s/ (broker %s)", config.broker.site, server.url,
             config.broker.address)
    # Under systemd (Type=notify): ready once the page is served; watchdog pings only while the
    # server and the MQTT loop live, so a dead one gets the service restarted.
    notifier = Notifier()
    notifier.ready(f"serving {server.url}/")
    period_s = min(notifier.watchdog_period_s or 2.0, 2.0)
    while not stop.wait(period_s):
        if server.alive and source.alive:
            notifier.watchdog()
        else:
            notifier.status("unhealthy: " + ("web server thread ended" if not server.alive
                                            else "MQTT network thread ended"))
    notifier.stopping()
    log.info("edge-web stopping")
    server.stop()
    source.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except WebConfigError as exc:
        print(f"edge-web: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, json_lines=not args.plain_logs)
    # waitress logs each queue warning at WARNING; its INFO lines ("Serving on ...") repeat ours.
    logging.getLogger("waitress").setLevel(logging.WARNING)
    with StopSignal() as stop:  # SIGTERM and SIGINT
        try:
            serve(config, stop)
        except OSError as exc:  # the port is taken, or the address is not this machine's
            log.error("cannot serve on %s:%d: %s", config.host, config.port, exc.strerror or exc)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
