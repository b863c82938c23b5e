"""`intentstream` command line: one sub-command per job.

Each sub-command lives in its own module with ``add_arguments(parser)`` and ``run(args, settings) -> int``;
only the module of the command being run is imported (torch and faust load slowly).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stream.settings import Settings, SettingsError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "stream.traffic.demo",
        "the main job: broker, topics, a model, a worker, replayed traffic, a summary line",
    ),
    "kafka": ("stream.broker.cli", "run a local single-node Apache Kafka broker (KRaft, no Docker)"),
    "topics": ("stream.topics", "create the input, output and dead-letter topics if missing"),
    "worker": ("stream.worker", "run a scoring worker (Faust app); start several to share the partitions"),
    "simulate": ("stream.traffic.simulator", "write synthetic clickstream with ground truth (JSON lines, .gz ok)"),
    "replay": ("stream.traffic.replay", "publish a file of events to the clickstream topic (rate, speed-up or max)"),
    "train": ("training.train", "train a GRU/CNN/hybrid/transformer intent+churn model and write a versioned artifact"),
    "export": (
        "models.export",
        "write an artifact's ONNX graphs (fp32, --int8) for INTENTSTREAM_RUNTIME=onnx|onnx-int8",
    ),
    "evaluate": ("training.evaluate", "compare models, baselines and the oracle on a held-out split"),
    "train-items": (
        "training.train_items",
        "train the item model (item-to-item collaborative filtering) and write a versioned artifact",
    ),
    "evaluate-items": (
        "training.evaluate_items",
        "item suggestions against popularity, category and recently-viewed baselines and the item oracle",
    ),
    "settings": ("stream.settings", "print the effective settings (JSON, secrets masked) or the README table"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intentstream",
        description="Real-time purchase-intent and churn scoring on Kafka clickstream. Settings come from "
        "INTENTSTREAM_* environment variables (`intentstream settings --table` lists them).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    from stream.broker import BrokerError
    from stream.topics import KafkaAccessError, TopicLayoutError

    try:
        settings = Settings.from_env()
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args, settings) or 0)
    except SettingsError as exc:
        print(f"intentstream: bad setting: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, KafkaAccessError, TopicLayoutError, FileNotFoundError) as exc:  # users fix these: one line
        print(f"intentstream: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
