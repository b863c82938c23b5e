"""Security settings: Kafka TLS and SASL reach Faust and aiokafka as configured, the HTTP endpoints bind to
loopback, and neither payloads nor secrets reach the worker's log.

Model artifacts (sha256 checked before loading, safetensors never unpickled) are covered by tests/test_model.py:
test_tampered_weights_are_refused_and_the_previous_version_serves, test_weights_load_without_pickle.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import uuid
from typing import Any

import faust
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from stream.app import _broker_credentials
from stream.settings import Settings
from stream.topics import kafka_client_kwargs
from tests.helpers import (
    BASE_TS,
    Worker,
    consume,
    create_app_offline,
    encode,
    make_events,
    produce,
    wait_assigned,
    write_model,
)

PASSWORD = "s3cr3t-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throw-away CA and a client certificate signed by it (PEM files), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=intentstream-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=intentstream-worker", "-keyout", "client.key",
        "-out", "client.csr")  # fmt: skip
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-out", "client.pem")  # fmt: skip
    return {"cafile": str(d / "ca.pem"), "certfile": str(d / "client.pem"), "keyfile": str(d / "client.key")}


def tls_settings(pki: dict[str, str], **overrides: str) -> Settings:
    values = {
        "kafka_bootstrap": "broker.example:9093",
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": pki["cafile"],
        "kafka_ssl_certfile": pki["certfile"],
        "kafka_ssl_keyfile": pki["keyfile"],
    }
    return Settings.from_env({}, **{**values, **overrides})


def built(cls: type, kwargs: dict) -> Any:
    """An aiokafka client constructed (not started): its constructor checks the security settings."""

    async def make() -> Any:
        return cls(**kwargs)

    return asyncio.run(make())


def same_tls(a: object, b: object) -> bool:
    """Two TLS contexts built from the same settings: same verification and the same trusted CAs."""
    return (
        isinstance(a, ssl.SSLContext)
        and isinstance(b, ssl.SSLContext)
        and (a.verify_mode, a.check_hostname, a.get_ca_certs()) == (b.verify_mode, b.check_hostname, b.get_ca_certs())
    )


def test_plaintext_passes_no_tls_or_sasl():
    s = Settings.from_env({})
    assert kafka_client_kwargs(s) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert _broker_credentials(s) is None
    assert credentials_to_aiokafka_auth(_broker_credentials(s)) == {"security_protocol": "PLAINTEXT"}


def test_mutual_tls_reaches_our_clients_and_faust(pki):
    s = tls_settings(pki)
    kwargs = kafka_client_kwargs(s)
    ctx = kwargs["ssl_context"]
    assert kwargs["security_protocol"] == "SSL" and isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname  # the broker is verified
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert {"commonName": "intentstream-test-ca"} in subjects  # our CA, not only the system's
    creds = _broker_credentials(s)
    assert isinstance(creds, faust.SSLCredentials) and same_tls(creds.context, ctx)
    auth = credentials_to_aiokafka_auth(creds)  # what Faust hands to its consumer and producers
    assert auth["security_protocol"] == "SSL" and auth["ssl_context"] is creds.context
    producer = built(AIOKafkaProducer, kwargs)  # aiokafka refuses SSL without a context: it takes ours
    assert producer.client._security_protocol == "SSL" and producer.client._ssl_context is ctx


def test_a_client_key_that_does_not_match_its_certificate_is_refused(pki, tmp_path):
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    with pytest.raises(ssl.SSLError):
        kafka_client_kwargs(tls_settings(pki, kafka_ssl_keyfile=str(other)))


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_reaches_our_clients_and_faust(pki, mechanism):
    s = tls_settings(
        pki,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="worker",
        kafka_sasl_password=PASSWORD,
    )
    kwargs = kafka_client_kwargs(s)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        mechanism,
        "worker",
        PASSWORD,
    )
    creds = _broker_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    auth = credentials_to_aiokafka_auth(creds)  # what Faust hands to its consumer and producers
    assert same_tls(auth.pop("ssl_context"), kwargs["ssl_context"])
    assert auth == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "worker",
        "sasl_plain_password": PASSWORD,
    }
    consumer = built(AIOKafkaConsumer, kwargs)  # aiokafka checks the mechanism and the TLS context
    assert consumer._client._sasl_mechanism == mechanism and consumer._client._security_protocol == "SASL_SSL"
    assert PASSWORD not in repr(creds) and PASSWORD not in orjson.dumps(s.public_dict()).decode()


def test_sasl_plaintext_has_no_tls_context():
    s = Settings.from_env(
        {},
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="worker",
        kafka_sasl_password=PASSWORD,
    )
    assert "ssl_context" not in kafka_client_kwargs(s)
    auth = credentials_to_aiokafka_auth(_broker_credentials(s))
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["ssl_context"] is None


def test_the_app_gets_the_credentials_and_binds_its_web_server_to_loopback(pki, tmp_path, monkeypatch):
    s = tls_settings(
        pki,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="worker",
        kafka_sasl_password=PASSWORD,
        state_dir=str(tmp_path / "state"),
        model_dir=str(tmp_path / "models"),
        device="cpu",
    )
    assert Settings.from_env({}).web_host == "127.0.0.1"  # the default
    app = create_app_offline(s, monkeypatch)  # no broker: topic and offset preparation stubbed out
    creds = app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials) and creds.password == PASSWORD
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.protocol.value == "SASL_SSL"
    assert str(app.conf.broker[0]) == "kafka://broker.example:9093"
    # Faust listens on web_bind (its default: every interface), web_host only names the worker in URLs.
    assert app.conf.web_bind == "127.0.0.1" and app.conf.web_host == "127.0.0.1"


@pytest.mark.kafka
@pytest.mark.slow
def test_no_payload_or_secret_reaches_the_worker_log_and_the_web_port_is_loopback_only(fresh, tmp_path):
    from stream.traffic.badrecords import generate

    write_model(fresh.model_dir)
    marker = "PAYLOAD" + uuid.uuid4().hex[:12]
    worker = Worker(fresh, tmp_path)
    worker.env["INTENTSTREAM_KAFKA_SASL_PASSWORD"] = PASSWORD  # set, though PLAINTEXT does not use it
    worker.start()
    try:
        wait_assigned([worker], fresh.partitions)
        bad = [(k, v.replace(b"bad-", marker.encode())) for k, v, _, _ in generate(300, seed=5)]
        bad += [
            (marker.encode(), b"{" + marker.encode()),  # marker in the key and in broken JSON
            (b"u1", orjson.dumps({"event_id": marker, "user_id": "u1", "type": marker, "ts": BASE_TS})),
            (b"u1", marker.encode() * 5000),  # over the size limit
        ]
        events = make_events(n_users=5, sessions=1, seed=9)
        for e in events:
            e["item_id"] = e["category"] = marker  # a valid event carrying the marker
        produce(fresh, bad + encode(events))
        consume(fresh, [fresh.topic_dlq], until=lambda g: len(g[fresh.topic_dlq]) >= len(bad))
        assert worker.alive(), worker.tail()
        worker.get(f"/users/{events[0]['user_id']}/score")
        listening = [
            c.laddr
            for c in psutil.Process(worker.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "event=model_loaded" in log  # the log is there, with the worker's own lines
    assert marker not in log
    assert PASSWORD not in log
    for fragment in ("event_id", "user_id", '"ts"'):  # no JSON of any record either
        assert fragment not in log, fragment
