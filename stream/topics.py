"""Create the project's topics on any broker (idempotent)."""

from __future__ import annotations

import asyncio

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


async def ensure_topics_async(settings: Settings, extra: dict[str, int] | None = None) -> list[str]:
    """Create the input and output topics (and ``extra`` name -> partitions) that do not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = {t: settings.partitions for t in (settings.topic_clickstream, *settings.output_topics)}
    wanted.update(extra or {})
    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, settings.replication_factor) for name, n in wanted.items() if name not in existing]
        if missing:
            await admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        await admin.close()


def ensure_topics(settings: Settings, extra: dict[str, int] | None = None) -> list[str]:
    return asyncio.run(ensure_topics_async(settings, extra))


def add_arguments(parser):
    pass


def run(args, settings: Settings) -> int:
    created = ensure_topics(settings)
    print(f"topics: created {', '.join(created)}" if created else "topics: all present")
    return 0
