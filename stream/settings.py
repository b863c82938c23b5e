"""One settings object for every part of intentstream, read from INTENTSTREAM_* environment variables.

Each field documents itself (``help``) so that the README table, ``intentstream settings`` and the
docker-compose check all come from this one place.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "INTENTSTREAM_"
# Variables with our prefix that belong to the launcher (run.sh), not to the settings object.
NOT_SETTINGS = frozenset({"INTENTSTREAM_VENV"})


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable and what to do."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass(frozen=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = _f("127.0.0.1:9092", "Kafka bootstrap servers, comma separated (host:port).")
    kafka_controller_port: int = _f(
        9093, "Controller port of the local KRaft broker (`intentstream kafka start`).", minimum=1
    )
    kafka_plaintext: str = _f(
        "on",
        "The local broker's PLAINTEXT listener, at the port of KAFKA_BOOTSTRAP; off: clients reach it over SSL or "
        "SASL_SSL only (its KRaft controller listener stays plaintext, on 127.0.0.1).",
        choices=("on", "off"),
    )
    kafka_ssl_port: int = _f(
        0,
        "Port of the local broker's SSL listener (0: none). Its CA is made at the first start, in "
        "STATE_DIR/kafka/tls/ca.pem: clients set KAFKA_SSL_CAFILE to it.",
        minimum=0,
    )
    kafka_sasl_ssl_port: int = _f(
        0,
        "Port of the local broker's SASL_SSL listener (0: none), SCRAM-SHA-512 for the user KAFKA_SASL_USERNAME "
        "(default intentstream) with KAFKA_SASL_PASSWORD, or else a password generated into "
        "STATE_DIR/kafka/tls/scram-password.",
        minimum=0,
    )
    kafka_cache_dir: Path = _f(
        Path("~/.cache/intentstream"), "Cache of the Kafka jars resolved from Maven Central (local broker)."
    )
    kafka_security_protocol: str = _f(
        "PLAINTEXT", "Kafka security protocol.", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    )
    kafka_sasl_mechanism: str = _f("", "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) when SASL is on.")
    kafka_sasl_username: str = _f("", "SASL user name.")
    kafka_sasl_password: str = _f("", "SASL password (never logged).")
    kafka_ssl_cafile: str = _f("", "CA bundle (PEM) to verify the brokers when SSL is on.")
    kafka_ssl_certfile: str = _f("", "Client certificate (PEM) for mutual TLS.")
    kafka_ssl_keyfile: str = _f("", "Client private key (PEM) for mutual TLS.")
    # Topics
    topic_clickstream: str = _f("clickstream", "Input topic of clickstream events (key = user_id).")
    topic_dlq: str = _f("clickstream-dlq", "Dead-letter topic: every rejected input record, with its reason.")
    topic_intent: str = _f("purchase-intent", "Output topic of purchase-intent events (key = user_id).")
    topic_churn: str = _f("churn-alerts", "Output topic of churn alerts (key = user_id).")
    partitions: int = _f(4, "Partitions of the input and output topics (the unit of worker parallelism).", minimum=1)
    replication_factor: int = _f(1, "Replication factor of the topics the project creates.", minimum=1)
    # Worker
    app_id: str = _f("intentstream", "Faust app id: consumer group and prefix of the state changelog topics.")
    state_dir: Path = _f(Path("var"), "Local state folder: broker data, worker RocksDB tables, logs.")
    model_dir: Path = _f(Path("var/models"), "Model directory: one sub-folder per versioned artifact.")
    items_dir: Path = _f(
        Path("var/items/models"),
        "Item model directory (`intentstream train-items --out`): intent events carry `suggestions` from its newest "
        "valid artifact, swapped in when a newer one appears; none there (or the folder missing): `suggestions` is "
        "null.",
    )
    suggestions_k: int = _f(5, "Items suggested per intent event, at most.", minimum=1)
    device: str = _f("auto", "Scoring device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    runtime: str = _f(
        "torch",
        "Scoring runtime: torch (PyTorch), onnx (ONNX Runtime, fp32) or onnx-int8 (ONNX Runtime, dynamic int8); "
        "the onnx ones need the artifact exported first (`intentstream export`).",
        choices=("torch", "onnx", "onnx-int8"),  # models.runtime.RUNTIMES (not imported here: torch loads slowly)
    )
    window_size: int = _f(64, "Events kept per user in the rolling window.", minimum=1)
    batch_max_events: int = _f(
        256,
        "Score a batch once its whole fetches hold this many events ...",
        minimum=1,
    )
    batch_max_ms: float = _f(
        5.0,
        "... or once its first fetch has waited this long (ms) in the worker (the broker has held it already: "
        "fetch_min_bytes).",
        minimum=0,
    )
    batch_backlog_events: int = _f(
        4096,
        "... then also the fetches queued already, with no wait, up to this many events (fetches are whole; a fetch "
        "brings at most this many, or batch_max_events when higher): a worker that is behind scores bigger batches, "
        "which cost less per event.",
        minimum=1,
    )
    queue_max_events: int = _f(
        16384,
        "Bound of the input queue, in events (and one fetch more: a fetch is never split); a full queue holds the "
        "consumer's fetches back.",
        minimum=1,
    )
    torch_threads: int = _f(
        1, "CPU threads for model scoring, torch's or ONNX Runtime's (the event loop keeps the other cores).", minimum=1
    )
    fetch_min_bytes: int = _f(
        65_536,
        "The broker holds a worker's fetch until it has this many bytes for it (or fetch_max_wait_ms has passed): "
        "under paced traffic a fetch, and its hand-over from Faust's consumer thread to the scoring loop, then "
        "carries a few hundred records instead of a few dozen (the worker spent 10 points of a core less at 24,000 "
        "events/s, the same p99; docs/performance.md). 1: answer with whatever has come.",
        minimum=1,
    )
    fetch_max_wait_ms: int = _f(
        20,
        "Longest wait of a worker's fetch at the broker for fetch_min_bytes: at low rates, part of every event's "
        "latency (Faust's fixed 1500 ms stalls paced traffic).",
        minimum=1,
    )
    producer_compression: str = _f(
        "none",
        "Compression of the record batches the worker produces (intent events, alerts, DLQ, changelog): none, zstd, "
        "lz4, snappy or gzip. zstd shrank a batch of 256 intent events 17x (99 to 6 KB; less broker disk and network) at no "
        "measured cost in capacity, but every consumer must read it (Kafka clients 2.1+; Python: aiokafka[zstd]). "
        "Compressed input is read whatever this says.",
        choices=("none", "zstd", "lz4", "snappy", "gzip"),
    )
    producer_max_batch_bytes: int = _f(
        1_000_000,
        "Largest record batch the worker produces, in bytes (before compression). aiokafka sends one batch per "
        "partition per request, so a scored batch's outputs for a partition that do not fit in one cost another round "
        "trip (256 KB batches: -2% capacity, docs/performance.md). Keep it below the broker's message.max.bytes and the "
        "output and changelog topics' max.message.bytes (Kafka's default 1,048,588), or every full batch is refused "
        "and the worker exits.",
        minimum=16_384,
    )
    producer_request_timeout_s: float = _f(
        120.0,
        "How long a record batch the worker produces (outputs, changelog) may wait for a partition leader, and under "
        "at_least_once for its acknowledgement, retries included (exactly_once retries until its transaction ends), "
        "before it fails and the worker leaves without committing, for its supervisor to restart it and replay. "
        "Kafka's delivery.timeout.ms is 2 minutes; Faust's default 20 (a worker hung that long; docs/reliability.md).",
        minimum=5,
    )
    processing_guarantee: str = _f(
        "at_least_once", "Faust processing guarantee.", choices=("at_least_once", "exactly_once")
    )
    commit_interval_s: float = _f(
        1.0,
        "Input offsets and the users' changelog records are committed this often: a crash replays at most this much "
        "input, and exactly-once readers see outputs once their transaction commits.",
        minimum=0.05,
    )
    state_flush_s: float = _f(
        30.0,
        "The users table's RocksDB memtables are flushed to disk this often, and once a partition is restored. The "
        "stores have no write-ahead log (the changelog is their durable copy): after a crash a store comes back as of "
        "its last flush and the restart reads the rest back from the changelog; this bounds how much.",
        minimum=1,
    )
    recovery_stall_s: float = _f(
        120.0,
        "A table recovery that receives no changelog record for this long while it is behind (counted from its last "
        "record, its start or the group's last assignment, whichever is latest) ends the worker, for its supervisor to "
        "restart it (Faust's recovery stalled so in the chaos test, waiting minutes for records of partitions it had "
        "just taken over; a fresh worker recovered them).",
        minimum=5,
    )
    memory_trim_mb: int = _f(
        64,
        "While the worker's memory is this many MB or more above the lowest it has been, glibc's malloc_trim gives "
        "the heaps' free memory back to the system: at most once a second, every 4 s while trims give back less, and "
        "after a minute of those the memory in use is the new lowest (a burst of records near the size limit left "
        "74-324 MB behind in the allocator, 21-29 MB after a trim; stream/memory.py). 0: never.",
        minimum=0,
    )
    emit_policy: str = _f("on_change", "When to emit intent events.", choices=("on_change", "every_event"))
    emit_delta: float = _f(0.15, "on_change: emit when the score moved at least this much ...", minimum=0)
    emit_cooldown_s: float = _f(300.0, "... but at most once per user per this many seconds of event time.", minimum=0)
    session_gap_s: float = _f(1800.0, "A session closes after this much event time without an event.", minimum=1)
    churn_cooldown_s: float = _f(7 * 86400.0, "Quiet time after a churn alert unless the user returns.", minimum=0)
    max_watermark_lead_s: float = _f(
        60.0,
        "A partition's watermark (which closes sessions) never runs ahead of the wall clock by more than this; "
        "an event from a skewed clock is scored but closes no one's session early.",
        minimum=0,
    )
    allowed_lateness_s: float = _f(
        3600.0, "Events older than the user's newest event by more than this go to the DLQ.", minimum=0
    )
    max_record_bytes: int = _f(65536, "Input records larger than this are rejected to the DLQ.", minimum=256)
    web_host: str = _f("127.0.0.1", "Address the worker's HTTP endpoints bind to (loopback unless you mean it).")
    web_port: int = _f(6066, "Port of the worker's HTTP endpoints (/health, /metrics, /users/{id}/score).", minimum=1)
    web_url: str = _f(
        "",
        "URL at which the other workers reach this one's endpoints, advertised in the consumer group: "
        "/users/{id}/score is forwarded to the owner's URL. Default http://WEB_HOST:WEB_PORT, or with WEB_HOST "
        "0.0.0.0 (every interface, no address to give) this machine's hostname.",
    )
    log_level: str = _f("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def advertised_url(self) -> str:
        """The URL other workers use to reach this one (Faust's canonical URL): ``web_url``, or derived."""
        if self.web_url:
            return self.web_url.rstrip("/")
        host = socket.gethostname() if self.web_host in ("0.0.0.0", "::", "") else self.web_host
        return f"http://{host}:{self.web_port}"

    @property
    def broker_port(self) -> int:
        """Port the local broker listens on: the port of the first bootstrap address."""
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def broker_listeners(self) -> dict[str, int]:
        """The local broker's client listeners, security protocol -> port on 127.0.0.1."""
        listeners = {"PLAINTEXT": self.broker_port if self.kafka_plaintext == "on" else 0}
        listeners.update(SSL=self.kafka_ssl_port, SASL_SSL=self.kafka_sasl_ssl_port)
        return {protocol: port for protocol, port in listeners.items() if port}

    @property
    def output_topics(self) -> tuple[str, ...]:
        return (self.topic_dlq, self.topic_intent, self.topic_churn)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); ``overrides`` win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = PREFIX + f.name.upper()
            if f.name in overrides:
                raw: Any = overrides[f.name]
            elif var in env:
                raw = env[var]
            else:
                continue
            values[f.name] = _parse(f, var, raw)
        unknown = sorted(
            k for k in env if k.startswith(PREFIX) and k[len(PREFIX) :].lower() not in _NAMES and k not in NOT_SETTINGS
        )
        if unknown:
            raise SettingsError(f"{unknown[0]}: unknown setting; known ones are listed by `intentstream settings`")
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        for addr in self.kafka_bootstrap.split(","):
            host, sep, port = addr.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingsError(f"{PREFIX}KAFKA_BOOTSTRAP: {addr!r} is not host:port (example: 127.0.0.1:9092)")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise SettingsError(f"{PREFIX}KAFKA_SASL_MECHANISM: required when the security protocol is SASL")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise SettingsError(f"{PREFIX}DEVICE: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.web_url:
            url = urllib.parse.urlsplit(self.web_url)
            if url.scheme not in ("http", "https") or not url.hostname or url.hostname in ("0.0.0.0", "::"):
                raise SettingsError(
                    f"{PREFIX}WEB_URL: {self.web_url!r} is not a URL other workers can reach "
                    "(example: http://worker-1:6066)"
                )

    def child_env(self, **extra: object) -> dict[str, str]:
        """The environment of a child process (a worker, a load generator): ours without INTENTSTREAM_* (but
        INTENTSTREAM_VENV), then every setting spelled out, ``extra`` settings last. The password is passed on: it
        is the child's too."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX) or k == "INTENTSTREAM_VENV"}
        for key, value in {**self.public_dict(), **extra}.items():
            if key == "kafka_sasl_password" and key not in extra:
                value = self.kafka_sasl_password
            env[f"{PREFIX}{key.upper()}"] = str(value)
        return env

    def public_dict(self) -> dict[str, Any]:
        """Settings as plain JSON-able values, secrets masked (safe to log)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "kafka_sasl_password" and value:
                value = "***"
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


_NAMES = {f.name for f in dataclasses.fields(Settings)}


def _parse(f: dataclasses.Field[Any], var: str, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "Path": Path}[f.type]
    meta = f.metadata
    if kind is int:
        try:
            value: Any = int(str(raw).strip().replace("_", ""))
        except ValueError:
            raise SettingsError(f"{var}: expected a whole number, got {raw!r}") from None
    elif kind is float:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise SettingsError(f"{var}: expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{var}: expected a finite number, got {raw!r}")
    elif kind is Path:
        if not str(raw).strip():
            raise SettingsError(f"{var}: expected a path, got an empty value")
        value = Path(str(raw)).expanduser()
    else:
        value = str(raw).strip()
        if meta["choices"] and f.name in ("log_level", "kafka_security_protocol"):
            value = value.upper()
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise SettingsError(f"{var}: must be at least {meta['minimum']:g}, got {raw!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise SettingsError(f"{var}: expected one of {', '.join(meta['choices'])}, got {raw!r}")
    return value


def settings_table() -> str:
    """The markdown table of all settings, for the README."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
        rows.append(f"| `{PREFIX}{f.name.upper()}` | `{f.default}` | {f.metadata['help']}{choices} |")
    return "\n".join(rows)


def add_arguments(parser: Any) -> None:
    parser.add_argument("--table", action="store_true", help="print the markdown table of all settings instead")


def run(args: Any, settings: Settings) -> int:
    import orjson

    if args.table:
        print(settings_table())
    else:
        print(orjson.dumps(settings.public_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0
