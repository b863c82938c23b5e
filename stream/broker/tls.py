"""TLS and SCRAM of the local broker: its own certificate authority and its SASL user.

Everything lives in ``<state_dir>/kafka/tls`` and is made once, at the first start that asks for an SSL or SASL_SSL
listener: a self-signed CA (``ca.pem``, the file clients trust), the broker's key and certificate signed by it (PEM,
which Kafka reads without a Java keystore or a keystore password), and, unless ``INTENTSTREAM_KAFKA_SASL_PASSWORD``
gives one, a generated SCRAM password. Private keys and the password file are 0600. Later starts reuse them, so a
client configured once keeps working.

The SCRAM user is written through the controller's own listener (plaintext, 127.0.0.1 only) after every start:
that works on a data folder formatted long ago without security, and even with every client listener behind SASL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from stream.settings import Settings

DEFAULT_SCRAM_USER = "intentstream"
SCRAM_MECHANISM = "SCRAM-SHA-512"
# Kafka's codes of the mechanisms in AlterUserScramCredentials (ScramMechanism.type()).
_SCRAM_CODE = {"SCRAM-SHA-256": 1, "SCRAM-SHA-512": 2}
SCRAM_ITERATIONS = 8192
CERT_DAYS = 3650


class TlsError(RuntimeError):
    """The CA, the broker certificate or the SCRAM user could not be made; the message says what to do."""


@dataclass(frozen=True)
class Pki:
    """The local broker's TLS and SCRAM files, all in one folder."""

    folder: Path
    ca: Path  # what clients trust (INTENTSTREAM_KAFKA_SSL_CAFILE)
    ca_key: Path
    key: Path  # the broker's
    cert: Path
    password_file: Path  # the generated SCRAM password, when none is configured

    @classmethod
    def at(cls, folder: Path) -> Pki:
        names = ("ca.pem", "ca.key", "broker.key", "broker.pem", "scram-password")
        return cls(folder, *(folder / name for name in names))

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.ca, self.ca_key, self.key, self.cert))


def pki(settings: Settings) -> Pki:
    return Pki.at((settings.state_dir / "kafka" / "tls").resolve())


def ensure_pki(folder: Pki) -> Pki:
    """The CA and the broker's certificate (SAN 127.0.0.1 and localhost), made if either is missing."""
    if folder.complete():
        return folder
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("`openssl` not found on PATH: it makes the local broker's CA (Debian: apt-get install openssl)")
    folder.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder.folder, 0o700)
    csr, ext = folder.folder / "broker.csr", folder.folder / "broker.ext"
    # Python's TLS (OpenSSL 3) checks the extensions strictly: a CA that says it is one, a server certificate
    # whose subject alternative names hold the addresses clients dial.
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    old = os.umask(0o077)  # the keys are born 0600
    try:
        _openssl(openssl, folder.folder,
                 "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(CERT_DAYS),
                 "-subj", "/CN=intentstream local Kafka CA", "-keyout", folder.ca_key.name, "-out", folder.ca.name,
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
        _openssl(openssl, folder.folder,
                 "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                 "-keyout", folder.key.name, "-out", csr.name)  # fmt: skip
        _openssl(openssl, folder.folder,
                 "x509", "-req", "-in", csr.name, "-CA", folder.ca.name, "-CAkey", folder.ca_key.name,
                 "-CAcreateserial", "-days", str(CERT_DAYS), "-extfile", ext.name, "-out", folder.cert.name)  # fmt: skip
    finally:
        os.umask(old)
    for leftover in (csr, ext, folder.folder / "ca.srl"):
        leftover.unlink(missing_ok=True)
    for public in (folder.ca, folder.cert):
        os.chmod(public, 0o644)
    return folder


def _openssl(openssl: str, cwd: Path, *args: str) -> None:
    proc = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed making the local broker's CA: {proc.stderr.strip()[-300:]}")


def scram_user(settings: Settings) -> str:
    return settings.kafka_sasl_username or DEFAULT_SCRAM_USER


def scram_password(settings: Settings, folder: Pki, create: bool = True) -> str:
    """The configured SASL password, or the one generated at the first start into a 0600 file (made now unless
    ``create`` is false: then "")."""
    if settings.kafka_sasl_password:
        return settings.kafka_sasl_password
    if folder.password_file.is_file():
        return folder.password_file.read_text().strip()
    if not create:
        return ""
    folder.folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(folder.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def salted_password(password: str, salt: bytes, iterations: int, mechanism: str = SCRAM_MECHANISM) -> bytes:
    """SCRAM's Hi() (RFC 5802), which is PBKDF2 with the mechanism's HMAC: what Kafka stores, never the password."""
    digest = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mechanism]
    return hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)


def _scram_request() -> Any:
    """aiokafka has no AlterUserScramCredentials (API 51, KIP-554): its version 0, in aiokafka's protocol types."""
    from aiokafka.protocol.api import Request, RequestStruct, Response
    from aiokafka.protocol.types import (
        CompactArray,
        CompactBytes,
        CompactString,
        Int8,
        Int16,
        Int32,
        Schema,
        TaggedFields,
    )

    class AlterUserScramCredentialsResponse_v0(Response):
        API_KEY = 51
        API_VERSION = 0
        SCHEMA = Schema(
            ("throttle_time_ms", Int32),
            (
                "results",
                CompactArray(
                    ("user", CompactString("utf-8")),
                    ("error_code", Int16),
                    ("error_message", CompactString("utf-8")),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    class AlterUserScramCredentialsRequest_v0(RequestStruct):
        FLEXIBLE_VERSION = True
        API_KEY = 51
        API_VERSION = 0
        RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
        SCHEMA = Schema(
            ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields))),
            (
                "upsertions",
                CompactArray(
                    ("name", CompactString("utf-8")),
                    ("mechanism", Int8),
                    ("iterations", Int32),
                    ("salt", CompactBytes),
                    ("salted_password", CompactBytes),
                    ("tags", TaggedFields),
                ),
            ),
            ("tags", TaggedFields),
        )

    Struct: TypeAlias = AlterUserScramCredentialsRequest_v0

    class AlterUserScramCredentialsRequest(Request[Struct]):
        API_KEY = 51

        def __init__(self, upsertions: list[tuple[Any, ...]]):
            self.upsertions = upsertions

        def build(self, request_struct_class: type[Struct]) -> Struct:
            return request_struct_class([], self.upsertions, {})

    return AlterUserScramCredentialsRequest


async def upsert_scram_user(
    host: str, port: int, user: str, password: str, alive: Callable[[], bool], timeout_s: float = 60.0
) -> None:
    """Create or update ``user``'s SCRAM-SHA-512 credential through the controller listener at host:port, once the
    controller answers (it starts a moment after the process); ``alive``: whether the broker process still runs."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError

    salt = secrets.token_bytes(32)
    upsert: tuple[Any, ...] = (
        user,
        _SCRAM_CODE[SCRAM_MECHANISM],
        SCRAM_ITERATIONS,
        salt,
        salted_password(password, salt, SCRAM_ITERATIONS),
        {},
    )
    request = _scram_request()([upsert])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    problem = "no answer"
    while loop.time() < deadline and alive():
        try:
            conn = await create_conn(host, port, request_timeout_ms=10_000)
        except (TimeoutError, OSError, KafkaError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.5)
            continue
        try:
            response = await conn.send(request)
        finally:
            conn.close()
        errors = [(code, msg) for _user, code, msg, _tags in response.results if code]
        if not errors:
            return
        problem = f"error {errors[0][0]}: {errors[0][1]}"  # e.g. no controller elected yet
        await asyncio.sleep(0.5)
    raise TlsError(f"the controller at {host}:{port} did not take the SCRAM user {user!r} ({problem})")
