"""Create the project's topics on any broker (idempotent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

from stream.settings import Settings


def kafka_client_kwargs(settings: Settings) -> dict[str, object]:
    """Connection settings for every aiokafka client we create (TLS/SASL pass through from settings)."""
    kwargs: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if "SSL" in settings.kafka_security_protocol:
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile or None,
            certfile=settings.kafka_ssl_certfile or None,
            keyfile=settings.kafka_ssl_keyfile or None,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password
    return kwargs


class KafkaAccessError(RuntimeError):
    """The brokers cannot be used with the configured address, TLS or SASL settings: one line saying what to do.
    ``unreachable``: nothing answered at all (as opposed to answering and refusing us)."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@contextlib.contextmanager
def quiet_aiokafka() -> Iterator[None]:
    """aiokafka logs each failed connection as a warning (a traceback with DEBUG): noise when the failure is
    the answer we are after."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_access(settings: Settings, timeout_s: float = 15.0) -> None:
    """Connect as our clients will (address, TLS, SASL) and ask for metadata; a ``KafkaAccessError`` with one
    line that says what to fix otherwise. The worker, replay and the demo call it before anything else, so that a
    wrong password or an untrusted certificate stops them at once instead of retrying forever behind a wall of
    tracebacks."""
    asyncio.run(check_access_async(settings, timeout_s))


async def check_access_async(settings: Settings, timeout_s: float = 15.0) -> None:
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
    from aiokafka.protocol.metadata import MetadataRequest

    protocol = settings.kafka_security_protocol
    try:
        kwargs = kafka_client_kwargs(settings)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise KafkaAccessError(
            f"kafka: cannot load the TLS files ({exc}): check INTENTSTREAM_KAFKA_SSL_CAFILE, _CERTFILE and _KEYFILE"
        ) from None
    del kwargs["bootstrap_servers"]
    problems = []
    with quiet_aiokafka():
        for address in settings.kafka_bootstrap.split(","):
            host, _, port = address.strip().rpartition(":")
            where = f"{host}:{port}"
            try:
                async with asyncio.timeout(timeout_s):
                    conn = await create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000), **kwargs)
                    try:
                        await conn.send(MetadataRequest([]))
                    finally:
                        conn.close()
                return
            except SaslAuthenticationFailed:
                raise KafkaAccessError(
                    f"kafka: authentication failed for user {settings.kafka_sasl_username!r} "
                    f"({settings.kafka_sasl_mechanism}) at {where}: check INTENTSTREAM_KAFKA_SASL_USERNAME and "
                    "INTENTSTREAM_KAFKA_SASL_PASSWORD"
                ) from None
            except UnsupportedSaslMechanismError:
                raise KafkaAccessError(
                    f"kafka: the broker at {where} does not offer SASL mechanism {settings.kafka_sasl_mechanism}: "
                    "check INTENTSTREAM_KAFKA_SASL_MECHANISM"
                ) from None
            except ssl.SSLCertVerificationError as exc:
                raise KafkaAccessError(
                    f"kafka: the broker's certificate is not trusted ({exc.verify_message}) at {where}: set "
                    "INTENTSTREAM_KAFKA_SSL_CAFILE to the CA that signed it"
                ) from None
            except ssl.SSLError as exc:
                raise KafkaAccessError(
                    f"kafka: no TLS with {where} ({exc.reason}): is it a broker's SSL or SASL_SSL listener? check "
                    "INTENTSTREAM_KAFKA_BOOTSTRAP and INTENTSTREAM_KAFKA_SECURITY_PROTOCOL"
                ) from None
            except KafkaConnectionError as exc:
                if "closed" not in str(exc):
                    problems.append(f"{where}: {exc}")
                    continue
                raise KafkaAccessError(
                    f"kafka: the broker at {where} closed the connection of a {protocol} client: check "
                    "INTENTSTREAM_KAFKA_SECURITY_PROTOCOL (and the port: each listener has its own protocol)"
                ) from None
            except TimeoutError:  # an OSError too: first
                problems.append(f"{where}: no answer within {timeout_s:g} s")
            except ConnectionRefusedError:  # nothing listens there: the next bootstrap address may answer
                problems.append(f"{where}: connection refused")
            except OSError as exc:  # an unknown host, no route
                problems.append(f"{where}: {exc.strerror or exc}")
    raise KafkaAccessError(
        f"kafka: no broker answers at {settings.kafka_bootstrap} ({'; '.join(problems)}): start one "
        "(`intentstream kafka start`) or check INTENTSTREAM_KAFKA_BOOTSTRAP",
        unreachable=True,
    )


# Output records carry the broker's clock: their timestamp is when the broker appended them, so that end-to-end
# latency (input record's timestamp to output record's) is measured at the broker, not at the output's creation
# in the worker. Input topics keep CreateTime: the producer's own event-emission time.
OUTPUT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


USERS_TABLE = "users"  # the worker's table of user states (stream/app.py)
# A table's changelog as Faust creates it (faust.tables.base.Collection._new_changelog_topic): compacted, the newest
# state of each user kept.
CHANGELOG_TOPIC_CONFIG = {"cleanup.policy": "compact"}


def changelog_topic(settings: Settings) -> str:
    """The users table's changelog topic, as Faust names it (``{app id}-{table}-changelog``)."""
    return f"{settings.app_id}-{USERS_TABLE}-changelog"


class TopicLayoutError(RuntimeError):
    """A topic the worker needs cannot be created, or exists with a layout it cannot work with: one line that says
    what to do (a configuration to fix: the worker exits with code 2)."""


class TopicsNotReadyError(RuntimeError):
    """The worker's topics still lack a leader for some partition: transient (the worker exits with code 1, for its
    supervisor to start it again)."""


def _error_name(code: int) -> str:
    from aiokafka.errors import for_code

    return f"{for_code(code).__name__} ({code})"


@contextlib.asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[Any]:
    """An aiokafka admin client on the settings' brokers, started, and closed on the way out."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


def new_topic(settings: Settings, name: str, partitions: int) -> Any:
    """The aiokafka NewTopic for ``name``: an output topic of ``settings`` gets ``OUTPUT_TOPIC_CONFIG``, the users
    table's changelog ``CHANGELOG_TOPIC_CONFIG``."""
    from aiokafka.admin import NewTopic

    configs = OUTPUT_TOPIC_CONFIG if name in settings.output_topics else {}
    if name == changelog_topic(settings):
        configs = CHANGELOG_TOPIC_CONFIG
    return NewTopic(name, partitions, settings.replication_factor, topic_configs=dict(configs))


async def ensure_topics_async(
    settings: Settings, extra: dict[str, int] | None = None, *, changelog: bool = False, leaders_within_s: float = 30.0
) -> list[str]:
    """Create the input and output topics (and ``extra`` name -> partitions) that do not exist yet; returns the names
    created. A topic the broker refuses to create (a replication factor above the brokers', a policy) raises
    TopicLayoutError: left alone, the first client to ask for its metadata would have the broker create it with its
    defaults (``auto.create.topics.enable``: one partition, no LogAppendTime).

    ``changelog`` (the worker, before Faust starts): the users table's changelog too, and then wait until every
    partition of these topics has a leader. Left to Faust, the changelog was created as the consumer subscribed: a
    consumer whose first metadata came before the broker had the new topic left the changelog out of its assignment
    ("Ignoring missing topic"), and the worker's first changelog send then asked for the topic's metadata, which
    the broker answered by creating it with its default partition count: the worker left at its first commit
    ("Unrecognized partition"), or hung in it with its batches unacknowledged (docs/reliability.md, section 2). A
    changelog whose partition count is not ``settings.partitions`` is refused: its partitions are the input's, one
    for one."""
    wanted = {t: settings.partitions for t in (settings.topic_clickstream, *settings.output_topics)}
    if changelog:
        wanted[changelog_topic(settings)] = settings.partitions
    wanted.update(extra or {})
    async with admin_client(settings) as admin:
        created = await create_missing_topics(admin, settings, wanted)
        if changelog:
            await wait_for_leaders(admin, settings, wanted, leaders_within_s)
        return created


async def create_missing_topics(admin: Any, settings: Settings, wanted: dict[str, int]) -> list[str]:
    """Create the topics of ``wanted`` (name -> partitions) that do not exist yet, each as ``new_topic`` makes it;
    returns the names created. A topic the broker refuses to create raises TopicLayoutError."""
    from aiokafka.errors import TopicAlreadyExistsError

    existing = set(await admin.list_topics())
    missing = [new_topic(settings, name, n) for name, n in wanted.items() if name not in existing]
    if missing:
        response = await admin.create_topics(missing)
        refused = [
            f"{topic}: {_error_name(code)}"
            for topic, code, *_ in getattr(response, "topic_errors", [])
            if code not in (0, TopicAlreadyExistsError.errno)  # created meanwhile by another worker: fine
        ]
        if refused:
            raise TopicLayoutError(
                f"kafka: the broker refused to create {'; '.join(refused)}: check INTENTSTREAM_REPLICATION_FACTOR "
                "against the brokers, and the broker's topic policy"
            )
    return [t.name for t in missing]


async def wait_for_leaders(admin: Any, settings: Settings, wanted: dict[str, int], within_s: float) -> None:
    """Until every partition of ``wanted`` (topics that exist, or were just created) has a leader. TopicLayoutError
    when the changelog has another partition count than the input, or a topic answers with an error other than not
    yet being known or led; TopicsNotReadyError when leaders are still missing after ``within_s``."""
    from aiokafka.errors import LeaderNotAvailableError, UnknownTopicOrPartitionError

    not_yet = {UnknownTopicOrPartitionError.errno, LeaderNotAvailableError.errno}  # a topic created a moment ago
    name = changelog_topic(settings)
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        described = {t["topic"]: t for t in await admin.describe_topics(list(wanted))}
        n = len(described.get(name, {}).get("partitions", []))
        if n and n != settings.partitions:
            raise TopicLayoutError(
                f"kafka: topic {name} (the users table's changelog) has {n} partitions, the input "
                f"{settings.partitions} (INTENTSTREAM_PARTITIONS): the two must match, one for one. Either use "
                "another INTENTSTREAM_APP_ID (a new group and changelog: the states start empty), or delete this "
                "changelog together with the workers' state folders (INTENTSTREAM_STATE_DIR) and the group's "
                "committed offsets, so that the input is replayed from its start"
            )
        failed = sorted(
            f"{topic}: {_error_name(t['error_code'])}"
            for topic, t in described.items()
            if topic in wanted and t["error_code"] and t["error_code"] not in not_yet
        )
        if failed:
            raise TopicLayoutError(f"kafka: cannot use {'; '.join(failed)}")
        waiting = sorted(
            topic
            for topic in wanted
            if (t := described.get(topic)) is None
            or t["error_code"]
            or not t["partitions"]
            or any(p["leader"] < 0 for p in t["partitions"])
        )
        if not waiting:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TopicsNotReadyError(
                f"kafka: topics without a leader for every partition after {within_s:g} s: {', '.join(waiting)}: "
                "check the brokers (`intentstream kafka status`) and start the worker again"
            )
        await asyncio.sleep(0.1)


def ensure_topics(settings: Settings, extra: dict[str, int] | None = None) -> list[str]:
    return asyncio.run(ensure_topics_async(settings, extra))


def add_arguments(parser):
    pass


def run(args, settings: Settings) -> int:
    check_access(settings)
    created = ensure_topics(settings)
    print(f"topics: created {', '.join(created)}" if created else "topics: all present")
    return 0


async def init_group_offsets(settings: Settings, group_id: str, topic: str) -> int:
    """Commit the earliest offset for every partition of ``topic`` that ``group_id`` has no offset for.

    Why: a Faust worker with tables starts fetching while its tables recover and discards what it fetched;
    after recovery it seeks back to the committed offsets, but a brand-new group has none, so records
    already in the topic would be skipped. Committing "earliest" first makes that seek land at the start.
    Returns the number of partitions initialised (0 when the group already has offsets or is running).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings), group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return 0
        consumer.assign(tps)
        missing = [tp for tp in tps if await consumer.committed(tp) is None]
        if not missing:
            return 0
        earliest = await consumer.beginning_offsets(missing)
        try:
            await consumer.commit({tp: earliest[tp] for tp in missing})
        except KafkaError:  # the group is active: its members own the offsets
            return 0
        return len(missing)
    finally:
        await consumer.stop()
