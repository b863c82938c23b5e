"""`intentstream kafka start|stop|status`."""

from __future__ import annotations

import argparse

from stream import broker
from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("start", "stop", "status"),
        help="start: resolve the jars from Maven Central on first use, format the storage, start the broker and "
        "wait until it answers a metadata request (idempotent); stop: clean shutdown; "
        "status: exit 0 when a broker answers, 3 when none does",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "start":
        st = broker.start(settings)
    elif args.action == "stop":
        st = broker.stop(settings)
        print("kafka: stopped" if not st.running else st.line())
        return 0 if not st.running else 1
    else:
        st = broker.status(settings)
    print("\n".join(st.lines()))
    return 0 if st.running else 3
