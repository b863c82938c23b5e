"""`intentstream` command line: one sub-command per job. Heavy modules are imported lazily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from stream.settings import Settings, SettingsError


def _kafka(args: argparse.Namespace, settings: Settings) -> int:
    from stream import broker

    if args.action == "start":
        st = broker.start(settings)
    elif args.action == "stop":
        st = broker.stop(settings)
        print("kafka: stopped" if not st.running else st.line())
        return 0 if not st.running else 1
    else:
        st = broker.status(settings)
    print(st.line())
    return 0 if st.running else 3


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    import orjson

    if args.table:
        from stream.settings import settings_table

        print(settings_table())
    else:
        sys.stdout.write(orjson.dumps(settings.public_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from stream.topics import ensure_topics

    created = ensure_topics(settings)
    print(f"topics: created {', '.join(created)}" if created else "topics: all present")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "kafka": _kafka,
    "settings": _settings,
    "topics": _topics,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intentstream",
        description="Real-time purchase-intent and churn scoring on Kafka clickstream. "
        "Settings come from INTENTSTREAM_* environment variables (see `intentstream settings --table`).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("kafka", help="run a local single-node Apache Kafka broker (KRaft, no Docker)")
    p.add_argument(
        "action",
        choices=("start", "stop", "status"),
        help="start: resolve the jars from Maven Central on first use, format storage, start, wait until it "
        "answers (idempotent); stop: clean shutdown; status: exit 0 when a broker answers, 3 when not",
    )

    p = sub.add_parser("settings", help="print the effective settings (JSON, secrets masked)")
    p.add_argument("--table", action="store_true", help="print the markdown table of all settings instead")

    sub.add_parser("topics", help="create the input, output and dead-letter topics if missing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return COMMANDS[args.command](args, settings)
    except SettingsError as exc:
        print(f"intentstream: bad setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, not a traceback, for errors we expect users to fix
        from stream.broker import BrokerError

        if isinstance(exc, BrokerError):
            print(f"intentstream: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
