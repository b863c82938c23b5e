"""A real single-node Apache Kafka broker (KRaft) for development, tests and the demo, without Docker.

The jars come from Maven Central through ``pom.xml`` beside this file (Apache Kafka's own artifacts);
the broker runs as a plain ``java`` process whose config, data, log and pid live under
``<state_dir>/kafka``. ``start`` is idempotent and returns once the broker answers a metadata request.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fcntl
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.broker import tls
from stream.settings import Settings

HERE = Path(__file__).parent
POM = HERE / "pom.xml"
LOG_CONFIG = HERE / "log4j2.yaml"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class BrokerError(RuntimeError):
    """Something stops the local broker from running; the message says what to do."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool  # a broker answers metadata requests at the bootstrap address
    pid: int | None  # our broker process, if we started one and it is alive
    bootstrap: str
    detail: str
    notes: tuple[str, ...] = ()  # how to reach the SSL and SASL_SSL listeners, a restart the settings need

    def line(self) -> str:
        return f"kafka: {self.detail}"

    def lines(self) -> list[str]:
        return [self.line(), *(f"kafka: {note}" for note in self.notes)]


def kafka_version() -> str:
    text = POM.read_text()
    return text.split("<kafka.version>", 1)[1].split("</kafka.version>", 1)[0].strip()


def _home(settings: Settings) -> Path:
    return (settings.state_dir / "kafka").resolve()


def _libs(settings: Settings) -> Path:
    return settings.kafka_cache_dir.expanduser().resolve() / f"kafka-{kafka_version()}" / "libs"


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"`{tool}` not found on PATH: {hint}")
    return path


def new_cluster_id() -> str:
    """A random cluster id as Kafka writes them (URL-safe base64 of a UUID), never starting with '-': the storage
    tool would read one such as '-Xb3...' as an option and refuse to format (one start in 64 failed)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def ensure_artifacts(settings: Settings) -> Path:
    """Resolve Kafka's jars into the cache folder once; later calls only check the marker."""
    libs = _libs(settings)
    marker = libs / ".complete"
    if marker.exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    # Two brokers started at once (parallel tests, two chaos runs) would run two Mavens into one folder, and
    # one of them fails: the second waits for the first and then finds the marker.
    with open(libs.parent / ".resolve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return libs
        return _resolve(libs, marker)


def _resolve(libs: Path, marker: Path) -> Path:
    _require("java", "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
    mvn = _require("mvn", "install Apache Maven (Debian: apt-get install maven) to fetch the Kafka jars")
    libs.mkdir(parents=True, exist_ok=True)
    print(f"kafka: resolving Apache Kafka {kafka_version()} from Maven Central into {libs} ...", flush=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}", "-DincludeScope=runtime",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not list(libs.glob("kafka_2.13-*.jar")):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise BrokerError("maven could not resolve the Kafka jars: " + " | ".join(tail))
    marker.write_text(kafka_version())
    return libs


def _listeners(settings: Settings) -> dict[str, int]:
    """The client listeners to run; a clear error for a set that cannot be."""
    listeners = settings.broker_listeners
    if not listeners:
        raise BrokerError(
            "INTENTSTREAM_KAFKA_PLAINTEXT=off leaves the broker no listener: set INTENTSTREAM_KAFKA_SSL_PORT "
            "or INTENTSTREAM_KAFKA_SASL_SSL_PORT"
        )
    ports = [*listeners.values(), settings.kafka_controller_port]
    if len(set(ports)) < len(ports):
        shown = ", ".join(f"{p} {port}" for p, port in listeners.items())
        raise BrokerError(
            f"two listeners of the local broker on one port ({shown}, CONTROLLER {settings.kafka_controller_port}); "
            "PLAINTEXT is at the port of INTENTSTREAM_KAFKA_BOOTSTRAP: give each its own, or set "
            "INTENTSTREAM_KAFKA_PLAINTEXT=off"
        )
    return listeners


def _security_properties(settings: Settings, listeners: dict[str, int], inter_broker: str) -> list[str]:
    """TLS (PEM, no Java keystore) and SCRAM of the SSL and SASL_SSL listeners."""
    if listeners.keys() <= {"PLAINTEXT"}:
        return []
    pem = tls.pki(settings)
    # An unencrypted key is accepted inline only (a PEM keystore file needs a key password, a secret all the same);
    # server.properties is 0600 for it.
    chain = pem.cert.read_text().strip() + "\n" + pem.ca.read_text().strip()
    props = [
        "ssl.keystore.type=PEM",
        f"ssl.keystore.key={_prop(pem.key.read_text().strip())}",
        f"ssl.keystore.certificate.chain={_prop(chain)}",
        # The broker dials its own inter-broker listener (transaction markers): it trusts its CA.
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={_prop(str(pem.ca))}",
    ]
    if "SASL_SSL" in listeners:
        login = "org.apache.kafka.common.security.scram.ScramLoginModule required"
        if inter_broker == "SASL_SSL":  # the broker then logs in as a client of itself
            user, password = tls.scram_user(settings), tls.scram_password(settings, pem)
            login += f' username="{_jaas_quote(user)}" password="{_jaas_quote(password)}"'
            props.append(f"sasl.mechanism.inter.broker.protocol={tls.SCRAM_MECHANISM}")
        props += [
            f"sasl.enabled.mechanisms={tls.SCRAM_MECHANISM}",
            f"listener.name.sasl_ssl.{tls.SCRAM_MECHANISM.lower()}.sasl.jaas.config={_prop(login)};",
        ]
    return props


def _jaas_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _prop(value: str) -> str:
    """``value`` as a Java properties value (backslashes and newlines escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _server_properties(settings: Settings, data_dir: Path) -> str:
    cport = settings.kafka_controller_port
    listeners = _listeners(settings)
    inter_broker = next(iter(listeners))  # PLAINTEXT, else SSL, else SASL_SSL
    addresses = ",".join(f"{p}://127.0.0.1:{port}" for p, port in listeners.items())
    protocols = ",".join(f"{p}:{p}" for p in listeners)
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{cport}",
            f"listeners={addresses},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners={addresses}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={inter_broker}",
            # The controller listener stays plaintext: it is bound to 127.0.0.1 and only this node speaks to it.
            f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{protocols}",
            *_security_properties(settings, listeners, inter_broker),
            f"log.dirs={data_dir}",
            "num.partitions=1",
            # A single node: internal topics cannot have more than one replica.
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            # Tests and the demo start consumer groups often; the default 3 s delay only slows them.
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.retention.hours=168",
            "",
        ]
    )


def _java_cmd(libs: Path, main: str, *args: str) -> list[str]:
    java = _require("java", "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
    return [
        java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG_CONFIG}", "-cp", f"{libs}/*", main, *args,
    ]  # fmt: skip


def _read_pid(home: Path) -> int | None:
    try:
        pid = int((home / "broker.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A recycled pid would not be a java process running kafka.Kafka.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"kafka.Kafka" in cmdline else None


async def _answers_metadata(bootstrap: str, timeout_s: float = 3.0, **security: Any) -> bool:
    from aiokafka.client import AIOKafkaClient

    from stream.topics import quiet_aiokafka

    # A refused connection is an expected answer here ("not running"), not a warning for the user.
    with quiet_aiokafka():
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **security)
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)  # sends a MetadataRequest
            return bool(client.cluster.brokers())
        except Exception:
            return False
        finally:
            await client.close()


def answers_metadata(bootstrap: str, timeout_s: float = 3.0, **security: Any) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request; ``security``: the client's TLS/SASL keywords."""
    return asyncio.run(_answers_metadata(bootstrap, timeout_s, **security))


def answers(settings: Settings, timeout_s: float = 3.0) -> bool:
    """Whether a broker answers ``settings``' clients (their bootstrap, TLS and SASL)."""
    from stream.topics import kafka_client_kwargs

    try:
        kwargs = kafka_client_kwargs(settings)
    except (OSError, ValueError):  # a CA or key file that is not there (yet): no client could connect either
        return False
    return answers_metadata(str(kwargs.pop("bootstrap_servers")), timeout_s, **kwargs)


def _running_listeners(home: Path) -> dict[str, int]:
    """The client listeners in the broker's last written config (what a running broker listens on)."""
    try:
        text = (home / "server.properties").read_text()
    except FileNotFoundError:
        return {}
    line = next((ln for ln in text.splitlines() if ln.startswith("listeners=")), "listeners=")
    listeners = {}
    for address in line.split("=", 1)[1].split(","):
        name, sep, rest = address.partition("://")
        if sep and name != "CONTROLLER":
            listeners[name] = int(rest.rsplit(":", 1)[1])
    return listeners


def _local_client(settings: Settings, listeners: dict[str, int]) -> Settings:
    """Client settings that reach our own broker through its first listener, with its CA and SCRAM user."""
    if not listeners:
        return settings
    protocol, port = next(iter(listeners.items()))
    values: dict[str, Any] = {
        "kafka_bootstrap": f"127.0.0.1:{port}",
        "kafka_security_protocol": protocol,
        "kafka_ssl_certfile": "",
        "kafka_ssl_keyfile": "",
    }
    if protocol != "PLAINTEXT":
        values["kafka_ssl_cafile"] = str(tls.pki(settings).ca)
    if protocol == "SASL_SSL":
        values["kafka_sasl_mechanism"] = tls.SCRAM_MECHANISM
        values["kafka_sasl_username"] = tls.scram_user(settings)
        # Asking is no reason to make a password: a broker started with a configured one is asked with it.
        values["kafka_sasl_password"] = tls.scram_password(settings, tls.pki(settings), create=False)
    return dataclasses.replace(settings, **values)


def _shown(listeners: dict[str, int]) -> str:
    return ", ".join(f"{protocol} 127.0.0.1:{port}" for protocol, port in listeners.items())


def _client_notes(settings: Settings, listeners: dict[str, int]) -> tuple[str, ...]:
    """How to point clients at the SSL and SASL_SSL listeners (the password itself is never shown)."""
    if listeners.keys() <= {"PLAINTEXT"}:
        return ()
    pem = tls.pki(settings)
    notes = [f"CA of the SSL and SASL_SSL listeners: {pem.ca}"]
    common = f"INTENTSTREAM_KAFKA_SSL_CAFILE={pem.ca}"
    if "SSL" in listeners:
        notes.append(
            f"SSL clients: INTENTSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:{listeners['SSL']} "
            f"INTENTSTREAM_KAFKA_SECURITY_PROTOCOL=SSL {common}"
        )
    if "SASL_SSL" in listeners:
        password = "(the one you set)" if settings.kafka_sasl_password else f'"$(cat {pem.password_file})"'
        notes.append(
            f"SASL_SSL clients: INTENTSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:{listeners['SASL_SSL']} "
            f"INTENTSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL INTENTSTREAM_KAFKA_SASL_MECHANISM={tls.SCRAM_MECHANISM} "
            f"INTENTSTREAM_KAFKA_SASL_USERNAME={tls.scram_user(settings)} INTENTSTREAM_KAFKA_SASL_PASSWORD={password} "
            f"{common}"
        )
    return tuple(notes)


def status(settings: Settings) -> BrokerStatus:
    home = _home(settings)
    pid = _read_pid(home)
    running = _running_listeners(home) if pid else {}
    # Our own broker is asked through a listener it runs, as itself; any other through the clients' settings.
    up = answers(_local_client(settings, running) if running else settings)
    notes: tuple[str, ...] = ()
    if up and pid:
        detail = f"running (pid {pid}) at {_shown(running)}, data in {home / 'data'}"
        notes = _client_notes(settings, running)
        try:
            wanted = _listeners(settings)
        except BrokerError:
            wanted = running
        if wanted != running:
            notes += (
                f"the settings ask for {_shown(wanted)}: restart the broker to apply them "
                "(`intentstream kafka stop`, then `intentstream kafka start`)",
            )
    elif up:
        detail = f"a broker answers at {settings.kafka_bootstrap} (not started by intentstream)"
    elif pid:
        where = _shown(running) if running else settings.kafka_bootstrap
        detail = f"process {pid} is alive but does not answer at {where}; see {home}/broker.log"
        if list(running) == ["SASL_SSL"] and not tls.scram_password(settings, tls.pki(settings), create=False):
            notes = ("its one listener is SASL_SSL: set INTENTSTREAM_KAFKA_SASL_PASSWORD to the password it has",)
    else:
        detail = f"not running (bootstrap {settings.kafka_bootstrap})"
    return BrokerStatus(running=up, pid=pid, bootstrap=settings.kafka_bootstrap, detail=detail, notes=notes)


def start(settings: Settings, timeout_s: float = START_TIMEOUT_S) -> BrokerStatus:
    """Start the local broker unless one already answers; return once it answers a metadata request."""
    current = status(settings)
    if current.running:
        return current
    home = _home(settings)
    if current.pid:  # alive but not answering: it may still be starting
        return _wait_ready(settings, lambda: _read_pid(home) is not None, home, timeout_s)
    host = settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost"):
        raise BrokerError(
            f"no broker answers at {settings.kafka_bootstrap}, and the local broker only runs on 127.0.0.1; "
            "start your broker or set INTENTSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:9092"
        )
    listeners = _listeners(settings)
    if listeners.keys() - {"PLAINTEXT"}:
        tls.ensure_pki(tls.pki(settings))
    libs = ensure_artifacts(settings)
    data_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "server.properties"
    # It may hold the broker's TLS key (and with SASL_SSL alone, its SCRAM password): for its owner's eyes only.
    config.touch(mode=0o600)
    os.chmod(config, 0o600)
    config.write_text(_server_properties(settings, data_dir))
    if not (data_dir / "meta.properties").exists():
        cluster_id = new_cluster_id()
        fmt = subprocess.run(
            _java_cmd(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)),
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise BrokerError("formatting the broker storage failed: " + fmt.stderr.strip()[-500:])
    log = open(home / "broker.log", "ab")
    proc = subprocess.Popen(
        _java_cmd(libs, "kafka.Kafka", str(config)),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives the CLI; `intentstream kafka stop` ends it
        cwd=home,
    )
    log.close()
    (home / "broker.pid").write_text(str(proc.pid))

    # Poll the child itself: right after fork its /proc cmdline is still ours, not kafka.Kafka.
    def alive() -> bool:
        return proc.poll() is None

    if "SASL_SSL" in listeners:
        user, password = tls.scram_user(settings), tls.scram_password(settings, tls.pki(settings))
        try:
            asyncio.run(
                tls.upsert_scram_user("127.0.0.1", settings.kafka_controller_port, user, password, alive, timeout_s)
            )
        except tls.TlsError as exc:
            raise BrokerError(f"{exc}; see {home / 'broker.log'}") from None
    return _wait_ready(settings, alive, home, timeout_s)


def _wait_ready(settings: Settings, alive: Callable[[], bool], home: Path, timeout_s: float) -> BrokerStatus:
    deadline = time.monotonic() + timeout_s
    probe = _local_client(settings, _running_listeners(home))
    while time.monotonic() < deadline:
        if answers(probe, timeout_s=2.0):
            return status(settings)
        if not alive():
            tail = _log_tail(home)
            raise BrokerError(f"the broker exited while starting ({tail}); full log: {home / 'broker.log'}")
        time.sleep(0.5)
    raise BrokerError(f"the broker did not answer within {timeout_s:.0f} s; see {home / 'broker.log'}")


def _log_tail(home: Path) -> str:
    try:
        lines = (home / "broker.log").read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no log"
    errors = [ln for ln in lines if " ERROR " in ln] or lines
    return errors[-1][:300] if errors else "empty log"


def stop(settings: Settings, timeout_s: float = STOP_TIMEOUT_S) -> BrokerStatus:
    """Stop our broker with SIGTERM (a clean, controlled shutdown); SIGKILL only if it hangs."""
    home = _home(settings)
    pid = _read_pid(home)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _read_pid(home) is not None:
            time.sleep(0.2)
        if _read_pid(home) is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        (home / "broker.pid").unlink(missing_ok=True)
    return status(settings)
