"""The ``otel-zenml-analytics`` command.

``analytics opt-in|opt-out|status`` changes the machine's consent; ``sink`` runs
the local analytics server; ``events`` lists what it stored; ``relay`` receives OTLP
from a Collector and delivers its analytics events; ``check`` validates the
tracked-functions configuration; ``demo`` runs the end-to-end demo.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from otel_zenml_analytics import consent
from otel_zenml_analytics.settings import ConfigurationError


def _analytics(action: str) -> int:
    from otel_zenml_analytics.enums import AnalyticsEvent

    if action == "status":
        state = consent.state()
        override = consent.opt_in_override()
        enabled = consent.analytics_enabled()
        print(f"Analytics: {'opted in' if enabled else 'opted out'}")
        print(f"Config file: {consent.config_path()}")
        print(f"Anonymous id: {state.anonymous_id}")
        if override is not None:
            print(f"ZENML_ANALYTICS_OPT_IN overrides the file (file says "
                  f"{'opted in' if state.analytics_opt_in else 'opted out'}).")
        return 0
    opting_in = action == "opt-in"
    # The choice is saved first: whatever happens to the event below, it holds.
    consent.update(analytics_opt_in=opting_in)
    print(f"Analytics {'enabled' if opting_in else 'disabled'} for this machine "
          f"({consent.config_path()}).", flush=True)
    _send_consent_event(AnalyticsEvent.OPT_IN_ANALYTICS if opting_in
                        else AnalyticsEvent.OPT_OUT_ANALYTICS)
    return 0


CONSENT_EVENT_SECONDS = 5.0


def _send_consent_event(event: object) -> None:
    """Send the opt-in/opt-out event (always sent, as in ZenML) within a short deadline.

    Any failure is reported on stderr and changes nothing: the choice is already saved.
    """
    from otel_zenml_analytics import track
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings

    try:
        base = Settings.resolve()
        if base.endpoint is None:
            return
        settings = Settings.resolve(timeout=min(base.timeout, CONSENT_EVENT_SECONDS),
                                    max_retries=1)
        sdk = configure_sdk(settings)
        track(event)
        sdk.force_flush(int(CONSENT_EVENT_SECONDS * 1000))
        sdk.shutdown()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the choice is saved
        print(f"otel-zenml-analytics: the {getattr(event, 'value', event)!r} event was not "
              f"sent: {exc}", file=sys.stderr)


def _check() -> int:
    from otel_zenml_analytics.instrumentation.check import check_configuration

    resolved, problems = check_configuration()
    for line in resolved:
        print(line)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{len(resolved)} target(s) ok, {len(problems)} problem(s)")
    return 1 if problems else 0


def port_number(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535; argparse names the option when it is not."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command."""
    parser = argparse.ArgumentParser(prog="otel-zenml-analytics", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    analytics = commands.add_parser("analytics", help="show or change the analytics consent")
    analytics.add_argument("action", choices=["opt-in", "opt-out", "status"])

    sink = commands.add_parser("sink", help="run the local analytics server")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=port_number, default=8800)
    sink.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    sink.add_argument("--write-key", default=None, help="require this Segment write key")
    sink.add_argument("--fail-first", type=int, default=0,
                      help="answer 503 to the first N batch requests (for testing retries)")

    events = commands.add_parser("events", help="print the events a sink stored")
    source = events.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="the sink's SQLite file")
    source.add_argument("--url", help="a running sink, e.g. http://127.0.0.1:8800")
    events.add_argument("--json", action="store_true", help="print JSON")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    events.add_argument("--event", default=None)
    events.add_argument("--type", default=None)
    events.add_argument("--user", default=None)
    events.add_argument("--limit", type=int, default=100)

    commands.add_parser("check", help="validate the configuration of tracked functions")

    relay = commands.add_parser(
        "relay", help="receive OTLP logs and traces and deliver their analytics events")
    relay.add_argument("--host", default="127.0.0.1")
    relay.add_argument("--http-port", type=port_number, default=14318,
                       help="OTLP/HTTP port (0: any)")
    relay.add_argument("--grpc-port", type=port_number, default=14317,
                       help="OTLP/gRPC port (0: any)")
    relay.add_argument("--no-http", action="store_true", help="serve OTLP/gRPC only")
    relay.add_argument("--no-grpc", action="store_true", help="serve OTLP/HTTP only")
    relay.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' "
                            "(default: $OTEL_ZENML_ANALYTICS_RELAY_TOKEN)")
    relay.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                       help="largest request accepted, on the wire and decompressed")
    relay.add_argument("--endpoint", default=None,
                       help="analytics server (default: $OTEL_ZENML_ANALYTICS_ENDPOINT)")
    relay.add_argument("--format", choices=["segment", "zenml"], default=None,
                       help="wire format (default: $OTEL_ZENML_ANALYTICS_FORMAT or segment)")

    demo = commands.add_parser("demo", help="run the end-to-end demo on a local sink")
    demo.add_argument("--format", choices=["segment", "zenml"], default="segment")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "analytics":
            return _analytics(args.action)
        if args.command == "sink":
            from otel_zenml_analytics.sink import main_sink

            return main_sink(args.host, args.port, args.db, args.write_key, args.fail_first)
        if args.command == "events":
            from otel_zenml_analytics.events import main_events

            return main_events(args.db, args.url, args.json, args.follow, event=args.event,
                               type=args.type, user=args.user, limit=args.limit)
        if args.command == "check":
            return _check()
        if args.command == "relay":
            from otel_zenml_analytics.relay import main_relay

            return main_relay(args.host, None if args.no_http else args.http_port,
                              None if args.no_grpc else args.grpc_port, args.token,
                              args.max_request_bytes, args.endpoint, args.format)
        if args.command == "demo":
            from otel_zenml_analytics.demo import run_demo

            return run_demo(args.format)
    except ConfigurationError as exc:
        print(f"otel-zenml-analytics: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
