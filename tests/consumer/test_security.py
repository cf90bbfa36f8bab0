"""Kafka security settings: validation without a broker, then real SASL/SCRAM and TLS against a second
local broker started by ``scripts/kafka-sasl.sh`` (listeners: SASL_PLAINTEXT, SSL with client
certificates, SASL_SSL; see the script's header)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from consumer.errors import ConfigurationError
from consumer.security import check_kafka_connection, describe_kafka_error, kafka_security_kwargs
from tests.conftest import ROOT, random_topic_name, reachable, service_missing

# -- validation (no broker) ----------------------------------------------------------------------------


def test_plaintext_by_default_and_blank_values_are_unset() -> None:
    assert kafka_security_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert kafka_security_kwargs("", "", "", "", "", "", "") == {"security_protocol": "PLAINTEXT"}


def test_sasl_kwargs_for_aiokafka() -> None:
    kwargs = kafka_security_kwargs("sasl_plaintext", "scram-sha-512", "idv", " pass word ")
    assert kwargs == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "idv",
        "sasl_plain_password": " pass word ",  # a password is taken as given
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("KERBEROS",),
            "IDV_KAFKA_SECURITY_PROTOCOL: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        (("SASL_PLAINTEXT", None, "u", "p"), "IDV_KAFKA_SASL_MECHANISM: is required with SASL_PLAINTEXT"),
        (("SASL_SSL", "GSSAPI", "u", "p"), "IDV_KAFKA_SASL_MECHANISM: must be one of PLAIN, SCRAM-SHA-256"),
        (("SASL_PLAINTEXT", "SCRAM-SHA-256", None, "p"), "IDV_KAFKA_SASL_USERNAME: is required"),
        (
            ("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", ""),
            "IDV_KAFKA_SASL_PASSWORD: is required with SASL_PLAINTEXT "
            "(set IDV_KAFKA_SASL_PASSWORD or IDV_KAFKA_SASL_PASSWORD_FILE)",
        ),
        # Settings that would be silently ignored are a forgotten protocol, not something to ignore.
        (("PLAINTEXT", "SCRAM-SHA-256"), "IDV_KAFKA_SASL_MECHANISM: is set but IDV_KAFKA_SECURITY_PROTOCOL"),
        (
            ("PLAINTEXT", None, "u"),
            "IDV_KAFKA_SASL_USERNAME: is set but IDV_KAFKA_SECURITY_PROTOCOL is PLAINTEXT",
        ),
        (("SSL", None, None, "p"), "IDV_KAFKA_SASL_PASSWORD: is set but IDV_KAFKA_SECURITY_PROTOCOL is SSL"),
        (("PLAINTEXT", None, None, None, "/ca.pem"), "IDV_KAFKA_SSL_CAFILE: is set but"),
        (("SASL_PLAINTEXT", "PLAIN", "u", "p", None, "/c.pem"), "IDV_KAFKA_SSL_CERTFILE: is set but"),
        (("SSL", None, None, None, None, None, "/k.pem"), "IDV_KAFKA_SSL_KEYFILE: is set without"),
        (
            ("SSL", None, None, None, "/nonexistent/ca.pem"),
            "IDV_KAFKA_SSL_CAFILE: '/nonexistent/ca.pem' does not exist or is not a file",
        ),
    ],
)
def test_invalid_combinations_name_the_variable(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        kafka_security_kwargs(*args)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_plain_over_plaintext_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="consumer.security"):
        kafka_security_kwargs("SASL_PLAINTEXT", "PLAIN", "u", "secret-pw")
    assert "unencrypted" in caplog.text
    assert "secret-pw" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consumer.security"):
        kafka_security_kwargs("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", "p")
    assert caplog.text == ""


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_key: Path
    encrypted_key: Path
    garbage: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        service_missing("openssl", "apt-get install -y openssl")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    run("genpkey", *ec, "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=t-ca", "-days", "2", "-out", "ca.crt")
    run("genpkey", *ec, "-out", "c.key")
    run("req", "-x509", "-new", "-key", "c.key", "-subj", "/CN=t-client", "-days", "2", "-out", "c.crt")
    run("genpkey", *ec, "-out", "other.key")
    run("genpkey", *ec, "-aes256", "-pass", "pass:pw", "-out", "enc.key")
    (d / "garbage.pem").write_text("not a certificate\n")
    return Pki(d / "ca.crt", d / "c.crt", d / "c.key", d / "other.key", d / "enc.key", d / "garbage.pem")


def test_ssl_context_with_ca_and_client_certificate(pki: Pki) -> None:
    import ssl

    kwargs = kafka_security_kwargs(
        "SSL", ssl_cafile=str(pki.ca), ssl_certfile=str(pki.cert), ssl_keyfile=str(pki.key)
    )
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "t-ca"),),)]
    # Without a CA file the system trust store is used (a public CA signs the brokers).
    sasl_ssl = kafka_security_kwargs("SASL_SSL", "SCRAM-SHA-256", "u", "p")
    assert isinstance(sasl_ssl["ssl_context"], ssl.SSLContext)


def test_tls_file_problems_name_the_variable(pki: Pki) -> None:
    def error(**files: Path) -> str:
        with pytest.raises(ConfigurationError) as info:
            kafka_security_kwargs("SSL", **{k: str(v) for k, v in files.items()})
        return str(info.value)

    assert error(ssl_cafile=pki.garbage).startswith("IDV_KAFKA_SSL_CAFILE: cannot load CA certificates from")
    assert error(ssl_certfile=pki.cert, ssl_keyfile=pki.other_key) == (
        "IDV_KAFKA_SSL_KEYFILE: the private key does not match the certificate"
    )
    # An encrypted key must not make OpenSSL prompt on the terminal (a daemon would hang at start-up).
    assert error(ssl_certfile=pki.cert, ssl_keyfile=pki.encrypted_key) == (
        "IDV_KAFKA_SSL_KEYFILE: the private key is encrypted; give an unencrypted key file"
    )
    assert error(ssl_certfile=pki.cert, ssl_keyfile=pki.key.with_name("missing.key")).startswith(
        "IDV_KAFKA_SSL_KEYFILE: "
    )
    assert error(ssl_certfile=pki.key.with_name("missing.crt")).startswith("IDV_KAFKA_SSL_CERTFILE: ")
    assert error(ssl_cafile=pki.ca.parent).endswith("does not exist or is not a file")  # a directory
    assert error(ssl_certfile=pki.garbage, ssl_keyfile=pki.key).startswith(
        "IDV_KAFKA_SSL_CERTFILE: cannot load the client certificate and key"
    )
    assert error(ssl_certfile=pki.cert).startswith("IDV_KAFKA_SSL_CERTFILE: ")  # no key in the file


def test_describe_kafka_error_never_shows_the_password() -> None:
    security = kafka_security_kwargs("SASL_PLAINTEXT", "SCRAM-SHA-256", "svc", "hunter2")
    line = describe_kafka_error(SaslAuthenticationFailed("bad"), security)
    assert line == (
        "the broker rejected the SASL credentials (SCRAM-SHA-256, user 'svc'); "
        "check IDV_KAFKA_SASL_USERNAME and IDV_KAFKA_SASL_PASSWORD"
    )
    assert "hunter2" not in line


# -- the SASL/TLS broker -------------------------------------------------------------------------------

SASL_BASE_PORT = int(os.environ.get("IDV_TEST_KAFKA_SASL_BASE_PORT", "19094"))
SASL_DATA_DIR = Path(os.environ.get("KAFKA_SASL_DATA_DIR", ".run/kafka-sasl"))
USER, PASSWORD = "idv", "idv-secret"


@dataclass(frozen=True)
class SecureBroker:
    sasl_plaintext: str
    ssl: str
    sasl_ssl: str
    tls: Path

    @property
    def ca(self) -> str:
        return str(self.tls / "ca.crt")


@pytest.fixture(scope="session")
def secure_broker() -> SecureBroker:
    host = "127.0.0.1"
    broker = SecureBroker(
        sasl_plaintext=f"{host}:{SASL_BASE_PORT}",
        ssl=f"{host}:{SASL_BASE_PORT + 3}",
        sasl_ssl=f"{host}:{SASL_BASE_PORT + 4}",
        tls=(SASL_DATA_DIR if SASL_DATA_DIR.is_absolute() else ROOT / SASL_DATA_DIR) / "tls",
    )
    if not reachable(broker.sasl_plaintext) and os.environ.get("IDV_TEST_START_KAFKA", "1") == "1":
        env = dict(os.environ, KAFKA_SASL_BASE_PORT=str(SASL_BASE_PORT))
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "kafka-sasl.sh"), "start"], env=env, check=False, timeout=300
        )
    if not reachable(broker.sasl_plaintext) or not (broker.tls / "ca.crt").exists():
        service_missing(
            f"SASL/TLS Kafka broker at {broker.sasl_plaintext}", "bash scripts/kafka-sasl.sh start"
        )
    return broker


@pytest.fixture(params=["SCRAM-SHA-256", "SCRAM-SHA-512"])
def mechanism(request: pytest.FixtureRequest) -> str:
    """Each SCRAM mechanism the secure broker enables (a test that lists its own cases parametrizes it)."""
    return str(request.param)


def scram(mechanism: str = "SCRAM-SHA-256", password: str = PASSWORD, user: str = USER) -> dict[str, Any]:
    return kafka_security_kwargs("SASL_PLAINTEXT", mechanism, user, password)


@pytest.fixture
async def secure_topic(secure_broker: SecureBroker) -> AsyncIterator[str]:
    """A fresh topic, created over the authenticated listener (admin requests go through SCRAM too)."""
    name = random_topic_name("sec")
    admin = AIOKafkaAdminClient(bootstrap_servers=secure_broker.sasl_plaintext, **scram())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    yield name


async def round_trip(bootstrap: str, topic: str, security: dict[str, Any]) -> list[bytes]:
    """Produce three records and consume them back with the same security settings."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **security)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, **security
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        with anyio.fail_after(30):
            while len(values) < 3:
                batch = await consumer.getmany(timeout_ms=500)
                values.extend(msg.value for msgs in batch.values() for msg in msgs)
    finally:
        await consumer.stop()
    return values


@pytest.mark.kafka
@pytest.mark.anyio
async def test_scram_credentials_produce_and_consume(
    secure_broker: SecureBroker, secure_topic: str, mechanism: str
) -> None:
    security = scram(mechanism)
    await check_kafka_connection(secure_broker.sasl_plaintext, security, timeout_s=5)
    assert await round_trip(secure_broker.sasl_plaintext, secure_topic, security) == [b"m0", b"m1", b"m2"]


@pytest.mark.kafka
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [
        ("SCRAM-SHA-256", USER, "wrong-password"),
        ("SCRAM-SHA-512", USER, "wrong"),
        ("SCRAM-SHA-256", "nobody", "x"),
    ],
)
async def test_wrong_credentials_fail_fast_with_a_clear_line(
    secure_broker: SecureBroker, mechanism: str, user: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    security = scram(mechanism, password, user)
    # What aiokafka itself does: start() raises a bare KafkaConnectionError("Unable to bootstrap from
    # [...]") that does not say why; the SaslAuthenticationFailed is only logged by aiokafka.client.
    consumer = AIOKafkaConsumer(bootstrap_servers=secure_broker.sasl_plaintext, **security)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError) as info:
        await consumer.start()
    assert time.monotonic() - started < 5
    await consumer.stop()
    assert "Unable to bootstrap from" in str(info.value)
    assert info.value.__cause__ is None
    assert "SaslAuthenticationFailed" in caplog.text
    # What the daemon can say instead: the real cause, one line, the variables to check, no password.
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as error:
        await check_kafka_connection(secure_broker.sasl_plaintext, security, timeout_s=5)
    assert time.monotonic() - started < 5
    assert str(error.value) == (
        f"Kafka {secure_broker.sasl_plaintext}: the broker rejected the SASL credentials ({mechanism}, "
        f"user {user!r}); check IDV_KAFKA_SASL_USERNAME and IDV_KAFKA_SASL_PASSWORD"
    )
    assert password not in str(error.value)


@pytest.mark.kafka
@pytest.mark.anyio
async def test_protocol_and_mechanism_mismatches_are_named(secure_broker: SecureBroker) -> None:
    async def line(bootstrap: str, security: dict[str, Any]) -> str:
        with pytest.raises(ConfigurationError) as info:
            await check_kafka_connection(bootstrap, security, timeout_s=5)
        return str(info.value)

    # The broker enables only SCRAM on this listener.
    assert (
        "does not enable SASL mechanism PLAIN on this listener; check IDV_KAFKA_SASL_MECHANISM"
        in await line(
            secure_broker.sasl_plaintext, kafka_security_kwargs("SASL_PLAINTEXT", "PLAIN", USER, PASSWORD)
        )
    )
    # A client without SASL: the connection opens, the first request is refused.
    assert "check IDV_KAFKA_SECURITY_PROTOCOL (is PLAINTEXT)" in await line(
        secure_broker.sasl_plaintext, kafka_security_kwargs()
    )
    # Nothing listening on the first server, bad password on the second: the password is the news.
    assert "rejected the SASL credentials" in await line(
        f"127.0.0.1:1,{secure_broker.sasl_plaintext}", scram(password="nope")
    )
    assert await line("127.0.0.1:1", kafka_security_kwargs()) == (
        "Kafka 127.0.0.1:1: connection refused (no broker listens there)"
    )


@pytest.mark.kafka
@pytest.mark.anyio
async def test_mutual_tls_produce_and_consume(secure_broker: SecureBroker, secure_topic: str) -> None:
    tls = secure_broker.tls
    security = kafka_security_kwargs(
        "SSL",
        ssl_cafile=secure_broker.ca,
        ssl_certfile=str(tls / "client.crt"),
        ssl_keyfile=str(tls / "client.key"),
    )
    await check_kafka_connection(secure_broker.ssl, security, timeout_s=5)
    assert await round_trip(secure_broker.ssl, secure_topic, security) == [b"m0", b"m1", b"m2"]


@pytest.mark.kafka
@pytest.mark.anyio
async def test_tls_without_client_certificate_or_with_the_wrong_ca_is_refused(
    secure_broker: SecureBroker,
) -> None:
    tls = secure_broker.tls
    with pytest.raises(ConfigurationError, match=r"requires a client certificate \(IDV_KAFKA_SSL_CERTFILE\)"):
        await check_kafka_connection(
            secure_broker.ssl, kafka_security_kwargs("SSL", ssl_cafile=secure_broker.ca), timeout_s=5
        )
    wrong_ca = kafka_security_kwargs(
        "SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD, ssl_cafile=str(tls / "other-ca.crt")
    )
    with pytest.raises(
        ConfigurationError, match=r"TLS certificate was not accepted .*check IDV_KAFKA_SSL_CAFILE"
    ):
        await check_kafka_connection(secure_broker.sasl_ssl, wrong_ca, timeout_s=5)


@pytest.mark.kafka
@pytest.mark.anyio
async def test_sasl_over_tls_produce_and_consume(
    secure_broker: SecureBroker, secure_topic: str, mechanism: str
) -> None:
    security = kafka_security_kwargs("SASL_SSL", mechanism, USER, PASSWORD, ssl_cafile=secure_broker.ca)
    await check_kafka_connection(secure_broker.sasl_ssl, security, timeout_s=5)
    assert await round_trip(secure_broker.sasl_ssl, secure_topic, security) == [b"m0", b"m1", b"m2"]
    with pytest.raises(ConfigurationError, match="rejected the SASL credentials"):
        await check_kafka_connection(
            secure_broker.sasl_ssl,
            kafka_security_kwargs("SASL_SSL", mechanism, USER, "bad", ssl_cafile=secure_broker.ca),
            timeout_s=5,
        )
