"""`intentstream worker`: one scoring worker. Start several (different web ports) to split the partitions."""

from __future__ import annotations

import argparse
import logging
import sys

from stream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--web-port",
        type=int,
        help="HTTP port of this worker (/health, /metrics, /users/{id}/score); default INTENTSTREAM_WEB_PORT. "
        "Each worker on one machine needs its own.",
    )
    parser.description = (
        "Consume the clickstream topic, keep per-user state in RocksDB tables, score events in batches and "
        "emit purchase-intent events and churn alerts. Workers with the same INTENTSTREAM_APP_ID form one "
        "consumer group. Needs a model in INTENTSTREAM_MODEL_DIR (`intentstream train`)."
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from stream.compat import CompatError, check_internals
    from stream.topics import check_access

    if args.web_port:
        settings = Settings.from_env(web_port=args.web_port)
    try:  # before the broker is asked anything: a library without the internals we patch is an install to fix
        check_internals()
    except CompatError as exc:
        print(f"intentstream: {exc}", file=sys.stderr)
        return 2
    # Faust would retry a refused login or an untrusted certificate forever, logging a traceback each time.
    check_access(settings)
    from faust.worker import Worker

    from stream.app import NoModelError, create_app
    from stream.topics import TopicLayoutError, TopicsNotReadyError

    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    try:
        app = create_app(settings)
    except (NoModelError, CompatError, TopicLayoutError) as exc:
        print(f"intentstream: {exc}", file=sys.stderr)
        return 2
    except TopicsNotReadyError as exc:  # transient: a supervisor starts the worker again
        print(f"intentstream: {exc}", file=sys.stderr)
        return 1
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()  # blocks; SIGTERM/SIGINT stop it cleanly
    return 0
