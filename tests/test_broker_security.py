"""TLS and SASL on a real broker: `intentstream kafka start` with an SSL and a SASL_SSL (SCRAM-SHA-512) listener
and its plaintext listener turned off; the worker, replay and the demo over SASL_SSL; a wrong password and an
untrusted certificate each stopping a client with one clear line, and no secret in any output or log.

The broker of this module is started twice on one state folder: first as before (plaintext only, a record written),
then by the CLI with the secure listeners and plaintext off, as a user who adds TLS to an existing broker would.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from load_tests.procs import free_port
from stream import broker
from stream.broker import tls
from stream.settings import Settings
from stream.topics import KafkaAccessError, check_access, ensure_topics
from tests.helpers import Worker, consume, encode, make_events, produce, wait_assigned, write_model

USER = tls.DEFAULT_SCRAM_USER
AUTH_FAILED = re.compile(
    r"intentstream: kafka: authentication failed for user '(\w+)' \(SCRAM-SHA-512\) at 127\.0\.0\.1:\d+: "
    r"check INTENTSTREAM_KAFKA_SASL_USERNAME and INTENTSTREAM_KAFKA_SASL_PASSWORD"
)
UNTRUSTED = re.compile(
    r"intentstream: kafka: the broker's certificate is not trusted \(.+\) at 127\.0\.0\.1:\d+: "
    r"set INTENTSTREAM_KAFKA_SSL_CAFILE to the CA that signed it"
)


@dataclass
class SecureBroker:
    settings: Settings  # the broker's own settings (its listeners)
    home: Path
    pem: tls.Pki
    password: str
    plaintext_port: int
    start_output: str  # what `intentstream kafka start` printed
    before_topic: str  # written over plaintext before the listeners changed
    restart_notes: tuple[str, ...]  # what `status` said of the plaintext broker with the secure settings

    def client(self, protocol: str = "SASL_SSL", tmp: Path | None = None, **overrides: object) -> Settings:
        """Client settings for one listener, with topics, group and state of their own."""
        tag = uuid.uuid4().hex[:8]
        port = self.settings.kafka_sasl_ssl_port if protocol == "SASL_SSL" else self.settings.kafka_ssl_port
        values: dict[str, object] = {
            "kafka_bootstrap": f"127.0.0.1:{port}",
            "kafka_security_protocol": protocol,
            "kafka_ssl_cafile": str(self.pem.ca),
            "topic_clickstream": f"clickstream-{tag}",
            "topic_dlq": f"clickstream-dlq-{tag}",
            "topic_intent": f"purchase-intent-{tag}",
            "topic_churn": f"churn-alerts-{tag}",
            "app_id": f"intentstream-tls-{tag}",
            "partitions": 2,
        }
        if protocol == "SASL_SSL":
            values.update(
                kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=USER, kafka_sasl_password=self.password
            )
        if tmp is not None:
            values.update(state_dir=str(tmp / "state"), model_dir=str(tmp / "models"))
        return Settings.from_env({}, **{**values, **overrides})

    def logs(self) -> str:
        """Every log the broker wrote."""
        return "".join(p.read_text(errors="replace") for p in self.home.rglob("*.log"))


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    for tool in ("openssl", "java"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not on PATH: the broker's CA needs openssl, the broker java")
    state = tmp_path_factory.mktemp("secure-broker")
    plain = free_port()
    before = Settings.from_env(
        {}, kafka_bootstrap=f"127.0.0.1:{plain}", kafka_controller_port=free_port(), state_dir=str(state)
    )
    after = dataclasses.replace(
        before, kafka_plaintext="off", kafka_ssl_port=free_port(), kafka_sasl_ssl_port=free_port()
    )
    before_topic = f"before-tls-{uuid.uuid4().hex[:8]}"
    try:
        broker.start(before)
        restart_notes = broker.status(after).notes  # the running broker lacks the listeners asked for
        produce(Settings.from_env({}, kafka_bootstrap=before.kafka_bootstrap, topic_clickstream=before_topic),
                [(b"k", b"written before TLS")])  # fmt: skip
        broker.stop(before)
        started = _cli(after.child_env(), "kafka", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        pem = tls.pki(after)
        yield SecureBroker(
            settings=after,
            home=state / "kafka",
            pem=pem,
            password=pem.password_file.read_text().strip(),
            plaintext_port=plain,
            start_output=started.stdout + started.stderr,
            before_topic=before_topic,
            restart_notes=restart_notes,
        )
    finally:
        broker.stop(after)


# ---- without a broker --------------------------------------------------------------------------------------------


def test_the_ca_is_made_once_kept_private_and_names_the_loopback_addresses(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("`openssl` is not on PATH")
    pem = tls.ensure_pki(tls.Pki.at(tmp_path / "tls"))
    first = {p: p.read_bytes() for p in (pem.ca, pem.ca_key, pem.key, pem.cert)}
    assert tls.ensure_pki(tls.Pki.at(tmp_path / "tls")) == pem
    assert {p: p.read_bytes() for p in first} == first  # reused, not made again
    for secret in (pem.ca_key, pem.key):
        assert secret.stat().st_mode & 0o777 == 0o600
    cert = ssl._ssl._test_decode_cert(str(pem.cert))  # type: ignore[attr-defined]
    assert set(cert["subjectAltName"]) == {("IP Address", "127.0.0.1"), ("DNS", "localhost")}
    ctx = ssl.create_default_context(cafile=str(pem.ca))  # Python's strict checks accept the CA
    assert [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()] == [
        {"commonName": "intentstream local Kafka CA"}
    ]


def test_a_generated_password_is_kept_in_a_private_file_and_a_given_one_wins(tmp_path: Path):
    pem = tls.Pki.at(tmp_path / "tls")
    settings = Settings.from_env({})
    generated = tls.scram_password(settings, pem)
    assert len(generated) >= 24 and pem.password_file.stat().st_mode & 0o777 == 0o600
    assert tls.scram_password(settings, pem) == generated
    assert tls.scram_password(Settings.from_env({}, kafka_sasl_password="given"), pem) == "given"


def test_the_listeners_follow_the_settings_and_impossible_sets_are_refused():
    s = Settings.from_env({}, kafka_bootstrap="127.0.0.1:19092", kafka_ssl_port=19094, kafka_sasl_ssl_port=19095)
    assert s.broker_listeners == {"PLAINTEXT": 19092, "SSL": 19094, "SASL_SSL": 19095}
    assert Settings.from_env({}).broker_listeners == {"PLAINTEXT": 9092}  # as before: plaintext only
    with pytest.raises(broker.BrokerError, match="leaves the broker no listener"):
        broker._listeners(Settings.from_env({}, kafka_plaintext="off"))
    with pytest.raises(broker.BrokerError, match="two listeners of the local broker on one port"):
        broker._listeners(Settings.from_env({}, kafka_bootstrap="127.0.0.1:19095", kafka_sasl_ssl_port=19095))


def test_nothing_listening_is_one_line_that_says_unreachable():
    port = free_port()
    with pytest.raises(KafkaAccessError) as err:
        check_access(Settings.from_env({}, kafka_bootstrap=f"127.0.0.1:{port}"), timeout_s=3)
    assert err.value.unreachable and "\n" not in str(err.value)
    assert str(err.value).startswith(f"kafka: no broker answers at 127.0.0.1:{port} (")


# ---- on the secure broker -----------------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_start_prints_the_listeners_the_ca_and_the_client_settings_but_never_the_password(secure: SecureBroker):
    out = secure.start_output
    s = secure.settings
    assert f"SSL 127.0.0.1:{s.kafka_ssl_port}, SASL_SSL 127.0.0.1:{s.kafka_sasl_ssl_port}" in out
    assert "PLAINTEXT" not in out.splitlines()[0]
    assert f"CA of the SSL and SASL_SSL listeners: {secure.pem.ca}" in out
    assert f"INTENTSTREAM_KAFKA_SSL_CAFILE={secure.pem.ca}" in out
    assert f'INTENTSTREAM_KAFKA_SASL_PASSWORD="$(cat {secure.pem.password_file})"' in out
    assert secure.password not in out
    for secret in (secure.pem.ca_key, secure.pem.key, secure.pem.password_file, secure.home / "server.properties"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    assert secure.password not in (secure.home / "server.properties").read_text()  # SSL is the inter-broker one
    status = _cli(s.child_env(), "kafka", "status")
    assert status.returncode == 0 and "running" in status.stdout and secure.password not in status.stdout


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_produce_and_consume_over_tls(secure: SecureBroker, protocol: str):
    s = secure.client(protocol)
    ensure_topics(s)
    records = [(f"user-{i % 5}".encode(), f'{{"n":{i}}}'.encode()) for i in range(200)]
    produce(s, records)
    got = consume(s, [s.topic_clickstream], until=lambda g: len(g[s.topic_clickstream]) >= len(records))
    assert sorted((m.key, m.value) for m in got[s.topic_clickstream]) == sorted(records)


@pytest.mark.kafka
@pytest.mark.slow
def test_plaintext_turned_off_refuses_and_the_data_written_before_is_there_over_sasl_ssl(secure: SecureBroker):
    plain = Settings.from_env({}, kafka_bootstrap=f"127.0.0.1:{secure.plaintext_port}")
    with pytest.raises(KafkaAccessError) as err:
        check_access(plain, timeout_s=3)
    assert err.value.unreachable and f"127.0.0.1:{secure.plaintext_port}: connection refused" in str(err.value)
    s = secure.settings
    assert secure.restart_notes == (
        f"the settings ask for SSL 127.0.0.1:{s.kafka_ssl_port}, SASL_SSL 127.0.0.1:{s.kafka_sasl_ssl_port}: restart "
        "the broker to apply them (`intentstream kafka stop`, then `intentstream kafka start`)",
    )
    listeners = next(
        ln for ln in (secure.home / "server.properties").read_text().splitlines() if ln.startswith("listeners=")
    )
    assert "PLAINTEXT://" not in listeners.replace("CONTROLLER://", "")  # the controller's own, loopback only
    s = secure.client(topic_clickstream=secure.before_topic)
    got = consume(s, [secure.before_topic], until=lambda g: len(g[secure.before_topic]) >= 1)
    assert [m.value for m in got[secure.before_topic]] == [b"written before TLS"]


@pytest.mark.kafka
@pytest.mark.slow
def test_the_worker_scores_over_sasl_ssl(secure: SecureBroker, tmp_path: Path):
    s = secure.client(tmp=tmp_path)
    write_model(s.model_dir)
    events = make_events(n_users=10, sessions=1, seed=3)
    worker = Worker(s, tmp_path, emit_policy="every_event").start()
    try:
        wait_assigned([worker], s.partitions)
        produce(s, encode(events))
        got = consume(s, [s.topic_intent], until=lambda g: len(g[s.topic_intent]) >= len(events))
        assert worker.alive(), worker.tail()
    finally:
        worker.stop()
    intents = [orjson.loads(m.value) for m in got[s.topic_intent]]
    assert sorted(i["event_id"] for i in intents) == sorted(e["event_id"] for e in events)
    log = worker.log_path.read_text(errors="replace")
    assert "event=model_loaded" in log and secure.password not in log
    assert secure.password not in secure.logs()


@pytest.mark.kafka
@pytest.mark.slow
def test_replay_publishes_over_sasl_ssl(secure: SecureBroker, tmp_path: Path):
    s = secure.client()
    events = make_events(n_users=8, sessions=1, seed=4)
    source = tmp_path / "events.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = _cli(s.child_env(), "replay", str(source))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"replay: {len(events)} records (0 malformed) to {s.topic_clickstream}" in proc.stdout
    got = consume(s, [s.topic_clickstream], until=lambda g: len(g[s.topic_clickstream]) >= len(events))
    replayed = [orjson.loads(m.value)["event_id"] for m in got[s.topic_clickstream]]
    assert sorted(replayed) == sorted(e["event_id"] for e in events)
    assert secure.password not in proc.stdout + proc.stderr


@pytest.mark.kafka
@pytest.mark.slow
def test_the_demo_runs_over_sasl_ssl(secure: SecureBroker, tmp_path: Path):
    s = secure.client(tmp=tmp_path)
    write_model(s.model_dir)
    proc = _cli(s.child_env(web_port=free_port()), "demo", "--events", "400", "--rate", "400", "--show", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].removeprefix("summary: ").split())
    assert int(summary["events"]) >= 400 and int(summary["scored"]) > 0
    assert secure.password not in proc.stdout + proc.stderr


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "replay", "demo"])
def test_a_wrong_password_stops_each_client_with_one_line_and_no_secret(
    secure: SecureBroker, tmp_path: Path, command: str
):
    wrong = "wrong-" + uuid.uuid4().hex
    s = secure.client(tmp=tmp_path, kafka_sasl_password=wrong)
    write_model(s.model_dir)
    source = tmp_path / "events.jsonl"
    source.write_text("".join(json.dumps(e) + "\n" for e in make_events(n_users=2, sessions=1)))
    args = {"worker": ["worker"], "replay": ["replay", str(source)], "demo": ["demo", "--events", "50"]}[command]
    proc = _cli(s.child_env(web_port=free_port()), *args, timeout=120)
    line = _one_line(proc)
    assert AUTH_FAILED.fullmatch(line), line
    assert wrong not in line and secure.password not in line
    logs = secure.logs() + "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert wrong not in logs and secure.password not in logs


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("trust", ["another CA", "the system's CAs"])
def test_an_untrusted_certificate_stops_the_worker_with_one_line(secure: SecureBroker, tmp_path: Path, trust: str):
    cafile = str(tls.ensure_pki(tls.Pki.at(tmp_path / "other")).ca) if trust == "another CA" else ""
    s = secure.client(tmp=tmp_path, kafka_ssl_cafile=cafile)
    write_model(s.model_dir)
    line = _one_line(_cli(s.child_env(web_port=free_port()), "worker", timeout=120))
    assert UNTRUSTED.fullmatch(line), line
    assert secure.password not in line


@pytest.mark.kafka
@pytest.mark.slow
def test_a_broker_with_sasl_ssl_alone_takes_transactions_and_keeps_a_given_password_out_of_its_log(tmp_path: Path):
    """SASL_SSL is then also the inter-broker listener (transaction markers): the broker logs in as the user."""
    if shutil.which("openssl") is None:
        pytest.skip("`openssl` is not on PATH")
    import asyncio

    from aiokafka import AIOKafkaProducer

    from stream.topics import kafka_client_kwargs

    password = "given-" + uuid.uuid4().hex
    port = free_port()
    own = Settings.from_env(
        {},
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        state_dir=str(tmp_path),
        kafka_plaintext="off",
        kafka_sasl_ssl_port=port,
        kafka_sasl_username="alice",
        kafka_sasl_password=password,
    )
    try:
        lines = broker.start(own).lines()
        assert lines[0].startswith("kafka: running (pid ") and f"at SASL_SSL 127.0.0.1:{port}," in lines[0]
        assert "INTENTSTREAM_KAFKA_SASL_PASSWORD=(the one you set)" in lines[-1] and password not in "".join(lines)
        client = Settings.from_env(
            {},
            kafka_bootstrap=f"127.0.0.1:{port}",
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="alice",
            kafka_sasl_password=password,
            kafka_ssl_cafile=str(tls.pki(own).ca),
        )
        ensure_topics(client)

        async def transaction() -> None:
            producer = AIOKafkaProducer(**kafka_client_kwargs(client), transactional_id=f"tx-{uuid.uuid4().hex}")
            await producer.start()
            try:
                async with producer.transaction():
                    await producer.send(client.topic_clickstream, b"in a transaction", key=b"k")
            finally:
                await producer.stop()

        asyncio.run(transaction())
        got = consume(client, [client.topic_clickstream], until=lambda g: len(g[client.topic_clickstream]) >= 1)
        assert [m.value for m in got[client.topic_clickstream]] == [b"in a transaction"]
        assert not tls.pki(own).password_file.exists()  # a given password is not written anywhere but the config
    finally:
        broker.stop(own)
    assert password not in (tmp_path / "kafka" / "broker.log").read_text(errors="replace")
