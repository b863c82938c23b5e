"""A real single-node Apache Kafka broker (KRaft) for development, tests and the demo, without Docker.

The jars come from Maven Central through ``pom.xml`` beside this file (Apache Kafka's own artifacts);
the broker runs as a plain ``java`` process whose config, data, log and pid live under
``<state_dir>/kafka``. ``start`` is idempotent and returns once the broker answers a metadata request.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    def line(self) -> str:
        return f"kafka: {self.detail}"


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


def _server_properties(settings: Settings, data_dir: Path) -> str:
    port, cport = settings.broker_port, settings.kafka_controller_port
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{cport}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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


async def _answers_metadata(bootstrap: str, timeout_s: float = 3.0) -> bool:
    from aiokafka.client import AIOKafkaClient

    # A refused connection is an expected answer here ("not running"), not a warning for the user.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)  # sends a MetadataRequest
        return bool(client.cluster.brokers())
    except Exception:
        return False
    finally:
        await client.close()
        quiet.setLevel(level)


def answers_metadata(bootstrap: str, timeout_s: float = 3.0) -> bool:
    return asyncio.run(_answers_metadata(bootstrap, timeout_s))


def status(settings: Settings) -> BrokerStatus:
    home = _home(settings)
    pid = _read_pid(home)
    up = answers_metadata(settings.kafka_bootstrap)
    if up and pid:
        detail = f"running (pid {pid}) at {settings.kafka_bootstrap}, data in {home / 'data'}"
    elif up:
        detail = f"a broker answers at {settings.kafka_bootstrap} (not started by intentstream)"
    elif pid:
        detail = f"process {pid} is alive but does not answer at {settings.kafka_bootstrap}; see {home}/broker.log"
    else:
        detail = f"not running (bootstrap {settings.kafka_bootstrap})"
    return BrokerStatus(running=up, pid=pid, bootstrap=settings.kafka_bootstrap, detail=detail)


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
    libs = ensure_artifacts(settings)
    data_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "server.properties"
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
    return _wait_ready(settings, lambda: proc.poll() is None, home, timeout_s)


def _wait_ready(settings: Settings, alive: Callable[[], bool], home: Path, timeout_s: float) -> BrokerStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers_metadata(settings.kafka_bootstrap, timeout_s=2.0):
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
