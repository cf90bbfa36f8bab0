"""Kafka client security: ``IDV_KAFKA_*`` settings → aiokafka keyword arguments, and a start-up check.

:func:`kafka_security_kwargs` validates the combination of protocol, SASL mechanism, credentials and TLS
files once, at start-up, and returns the keyword arguments that ``AIOKafkaConsumer``,
``AIOKafkaProducer`` and ``AIOKafkaAdminClient`` all accept. Every problem is a
:class:`~consumer.errors.ConfigurationError` whose message starts with the variable to fix.

:func:`check_kafka_connection` exists because aiokafka does not tell *why* it could not bootstrap: a wrong
SASL password, an unknown mechanism, an untrusted certificate and a refused connection all end in the same
``KafkaConnectionError("Unable to bootstrap from [...]")`` (the cause is only written to the ``aiokafka``
logger). The check opens one connection per bootstrap server with the same function aiokafka's own
bootstrap uses, sends a metadata request, and turns the first real cause into one line.

The returned dictionary holds the SASL password: never log it.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from typing import Any, NoReturn

import anyio
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from consumer.errors import ConfigurationError

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "SASL_MECHANISMS",
    "check_kafka_connection",
    "describe_kafka_error",
    "kafka_security_kwargs",
]

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

_V_PROTOCOL = "IDV_KAFKA_SECURITY_PROTOCOL"
_V_MECHANISM = "IDV_KAFKA_SASL_MECHANISM"
_V_USERNAME = "IDV_KAFKA_SASL_USERNAME"
_V_PASSWORD = "IDV_KAFKA_SASL_PASSWORD"  # noqa: S105 - the name of the variable, not a password
_V_CAFILE = "IDV_KAFKA_SSL_CAFILE"
_V_CERTFILE = "IDV_KAFKA_SSL_CERTFILE"
_V_KEYFILE = "IDV_KAFKA_SSL_KEYFILE"


class _EncryptedKey(Exception):
    pass


def _no_key_password() -> str:
    # Without a callback OpenSSL would prompt for the key's passphrase on the terminal and block start-up.
    raise _EncryptedKey


def _blank(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _fail(var: str, why: str) -> NoReturn:
    raise ConfigurationError(f"{var}: {why}")


def kafka_security_kwargs(
    protocol: str = "PLAINTEXT",
    sasl_mechanism: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ssl_cafile: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> dict[str, Any]:
    """aiokafka keyword arguments for the given security settings.

    Empty strings count as unset (the settings object stores unset strings as ``""``). Returns
    ``security_protocol`` always; ``sasl_mechanism``, ``sasl_plain_username`` and ``sasl_plain_password``
    for ``SASL_*``; ``ssl_context`` (from :func:`aiokafka.helpers.create_ssl_context`, hostname checking
    on) for ``SSL`` and ``SASL_SSL``. The CA file defaults to the system's trust store; a client
    certificate is optional (mutual TLS). Raises :class:`ConfigurationError` naming the variable.
    """
    proto = (_blank(protocol) or "PLAINTEXT").upper()
    mechanism = _blank(sasl_mechanism)
    username = _blank(username)
    # A password may legitimately contain spaces at its ends; only "empty" means unset.
    password = password or None
    cafile, certfile, keyfile = _blank(ssl_cafile), _blank(ssl_certfile), _blank(ssl_keyfile)

    if proto not in PROTOCOLS:
        _fail(_V_PROTOCOL, f"must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    uses_sasl = proto.startswith("SASL_")
    uses_tls = proto in ("SSL", "SASL_SSL")

    if not uses_sasl:
        # Credentials that would be silently ignored are almost always a forgotten protocol setting.
        for var, value in ((_V_MECHANISM, mechanism), (_V_USERNAME, username), (_V_PASSWORD, password)):
            if value is not None:
                _fail(var, f"is set but {_V_PROTOCOL} is {proto}; use SASL_PLAINTEXT or SASL_SSL")
    if not uses_tls:
        for var, value in ((_V_CAFILE, cafile), (_V_CERTFILE, certfile), (_V_KEYFILE, keyfile)):
            if value is not None:
                _fail(var, f"is set but {_V_PROTOCOL} is {proto}; use SSL or SASL_SSL")

    kwargs: dict[str, Any] = {"security_protocol": proto}

    if uses_sasl:
        if mechanism is None:
            _fail(_V_MECHANISM, f"is required with {proto} ({', '.join(SASL_MECHANISMS)})")
        mechanism = mechanism.upper()
        if mechanism not in SASL_MECHANISMS:
            _fail(_V_MECHANISM, f"must be one of {', '.join(SASL_MECHANISMS)} (got {sasl_mechanism!r})")
        if username is None:
            _fail(_V_USERNAME, f"is required with {proto}")
        if password is None:
            _fail(_V_PASSWORD, f"is required with {proto} (set {_V_PASSWORD} or {_V_PASSWORD}_FILE)")
        if mechanism == "PLAIN" and proto == "SASL_PLAINTEXT":
            log.warning(
                "SASL PLAIN over SASL_PLAINTEXT sends the Kafka password unencrypted; "
                "prefer SCRAM-SHA-512 or SASL_SSL"
            )
        kwargs.update(sasl_mechanism=mechanism, sasl_plain_username=username, sasl_plain_password=password)

    if uses_tls:
        if keyfile is not None and certfile is None:
            _fail(_V_KEYFILE, f"is set without {_V_CERTFILE}")
        kwargs["ssl_context"] = _ssl_context(cafile, certfile, keyfile)

    return kwargs


def _ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    # OpenSSL's errors do not say which file they are about; checking existence first lets the message
    # name the variable.
    for var, path in ((_V_CAFILE, cafile), (_V_CERTFILE, certfile), (_V_KEYFILE, keyfile)):
        if path is not None and not os.path.isfile(path):
            _fail(var, f"{path!r} does not exist or is not a file")
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        _fail(_V_CAFILE, f"cannot load CA certificates from {cafile!r} ({reason})")
    if certfile is None:
        return context
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_key_password)
    except _EncryptedKey:
        _fail(
            _V_KEYFILE if keyfile else _V_CERTFILE,
            "the private key is encrypted; give an unencrypted key file",
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail(_V_KEYFILE if keyfile else _V_CERTFILE, "the private key does not match the certificate")
        where = f"{certfile!r}" + (f" and {keyfile!r}" if keyfile else "")
        _fail(_V_CERTFILE, f"cannot load the client certificate and key from {where} ({exc.reason or exc})")
    except OSError as exc:
        _fail(_V_CERTFILE, f"cannot read {certfile!r} ({exc.strerror or type(exc).__name__})")
    return context


# -- start-up check ------------------------------------------------------------------------------------


def describe_kafka_error(exc: BaseException, security: Mapping[str, Any] | None = None) -> str:
    """One line for a connection failure: what went wrong and which variable to look at.

    Never contains the password. Works for the exceptions :func:`aiokafka.conn.create_conn` raises; for
    anything else it returns the exception's type name.
    """
    security = security or {}
    proto = security.get("security_protocol", "PLAINTEXT")
    mechanism = security.get("sasl_mechanism")
    user = security.get("sasl_plain_username")
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f"the broker rejected the SASL credentials ({mechanism}, user {user!r}); "
            f"check {_V_USERNAME} and {_V_PASSWORD}"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"the broker does not enable SASL mechanism {mechanism} on this listener; check {_V_MECHANISM}"
    if isinstance(exc, IllegalSaslStateError):
        return f"the listener does not expect SASL; check {_V_PROTOCOL} (is {proto}) and the port"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker's TLS certificate was not accepted ({exc.verify_message}); "
            f"check {_V_CAFILE} and the bootstrap host name"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check {_V_PROTOCOL} (is {proto}) and the port"
    if isinstance(exc, KafkaConnectionError):
        hint = f"check {_V_PROTOCOL} (is {proto}) and the port"
        if proto == "SSL":
            hint += f", and whether the listener requires a client certificate ({_V_CERTFILE})"
        return f"the broker closed the connection; {hint}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (no broker listens there)"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by the broker; check {_V_PROTOCOL} (is {proto}) and the port"
    if isinstance(exc, TimeoutError):
        return f"no answer in time; check the address and {_V_PROTOCOL} (is {proto})"
    if isinstance(exc, OSError):
        return f"cannot connect ({exc.strerror or type(exc).__name__})"
    return type(exc).__name__


# Causes that say something about the configuration rank above "this one host was down".
def _rank(exc: BaseException) -> int:
    if isinstance(exc, (SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError)):
        return 3
    if isinstance(exc, (ssl.SSLError, KafkaConnectionError, ConnectionResetError)):
        return 2
    return 1


async def check_kafka_connection(
    bootstrap: str,
    security: Mapping[str, Any],
    *,
    timeout_s: float = 10.0,
    client_id: str = "idv-consumer",
) -> None:
    """Connect to each bootstrap server until one answers a metadata request with these settings.

    Returns when one does; otherwise raises :class:`ConfigurationError` with the most telling cause
    (a rejected password beats a host that was down), e.g. ``Kafka 127.0.0.1:9094: the broker rejected
    the SASL credentials (SCRAM-SHA-256, user 'idv'); check IDV_KAFKA_SASL_USERNAME and
    IDV_KAFKA_SASL_PASSWORD``. Costs one connection per server tried, closed before returning.
    """
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    hosts = [h.strip() for h in bootstrap.split(",") if h.strip()]
    if not hosts:
        raise ConfigurationError("IDV_KAFKA_BOOTSTRAP: must not be empty")
    worst: tuple[int, str, BaseException] | None = None
    for hostport in hosts:
        host, sep, port_text = hostport.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ConfigurationError(f"IDV_KAFKA_BOOTSTRAP: {hostport!r} is not host:port")
        host = host.strip("[]")
        try:
            with anyio.fail_after(timeout_s):
                conn = await create_conn(
                    host,
                    int(port_text),
                    client_id=client_id,
                    request_timeout_ms=int(timeout_s * 1000),
                    **security,
                )
                try:
                    # PLAINTEXT to a SASL or TLS listener connects fine; the first request shows it.
                    await conn.send(MetadataRequest([]))
                finally:
                    closed = conn.close()
                    with anyio.move_on_after(1.0):
                        await closed
        except (OSError, KafkaError, TimeoutError) as exc:
            if worst is None or _rank(exc) > worst[0]:
                worst = (_rank(exc), hostport, exc)
            continue
        return
    assert worst is not None
    _, where, cause = worst
    raise ConfigurationError(f"Kafka {where}: {describe_kafka_error(cause, security)}")
