"""How a settings object is read: ``IDV_*`` variables, ``*_FILE`` secrets, the TOML config file, typed values.

:class:`EnvSettings` is the base of both frozen settings objects (the daemon's
:class:`consumer.settings.Settings` and the webhook intake's
:class:`consumer.webhooks.settings.WebhookSettings`): a field ``name`` is the variable ``IDV_NAME``; a
field listed in ``SECRETS`` may be given as ``IDV_NAME_FILE`` instead; invalid values raise
:class:`ConfigurationError` with one line naming the variable (:func:`need`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from consumer.errors import ConfigurationError

__all__ = [
    "PREFIX",
    "EnvSettings",
    "KafkaSettings",
    "check_logging",
    "config_file",
    "converter",
    "need",
    "read_env",
]

PREFIX = "IDV_"


def need(cond: bool, var: str, why: str) -> None:
    """One settings rule: raises :class:`ConfigurationError` naming ``IDV_<VAR>`` when ``cond`` is false."""
    if not cond:
        raise ConfigurationError(f"{PREFIX}{var.upper()}: {why}")


def _secret(env: Mapping[str, str], name: str) -> str | None:
    file_var = f"{PREFIX}{name}_FILE"
    if file_var in env:
        try:
            return Path(env[file_var]).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"{file_var}: cannot read {env[file_var]!r}: {exc.strerror}") from None
    return env.get(PREFIX + name)


def read_env(
    env: Mapping[str, str],
    converters: Mapping[str, Callable[[str], Any]],
    secrets: frozenset[str],
    values: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``values`` overlaid with each field's ``IDV_<NAME>`` (a secret also from ``IDV_<NAME>_FILE``),
    converted; an unset or empty variable leaves the value as it was, a bad one names its variable."""
    out = dict(values or {})
    for name, convert in converters.items():
        var = PREFIX + name.upper()
        raw = _secret(env, name.upper()) if name in secrets else env.get(var)
        if raw is None or raw == "":
            continue
        try:
            out[name] = convert(raw)
        except ValueError:
            raise ConfigurationError(f"{var}: invalid value (expected {convert.__name__})") from None
    return out


def config_file(path: str | None, converters: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like the settings (``max_in_flight = 64``),
    optionally under an ``[idv]`` table. Unknown keys are an error, not silently ignored."""
    if not path:
        return {}
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {path} is not valid TOML ({exc})") from None
    table = data.get("idv", data)
    if not isinstance(table, dict):
        raise ConfigurationError(f"{PREFIX}CONFIG_FILE: [idv] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in converters:
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: unknown setting {key!r} in {path}")
        if isinstance(value, dict | list):
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {key} must be a single value")
        try:
            values[key] = converters[key](str(value).lower() if isinstance(value, bool) else str(value))
        except ValueError:
            raise ConfigurationError(f"{PREFIX}CONFIG_FILE: {key}: invalid value") from None
    return values


def converter(kind: type) -> Callable[[str], Any]:
    """The parser of one field's variable, by the type of its default; its ``__name__`` is what an invalid
    value's message says was expected."""
    if kind is bool:

        def to_bool(raw: str) -> bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        to_bool.__name__ = "a boolean"
        return to_bool
    if kind is int:

        def to_int(raw: str) -> int:
            return int(raw.strip())

        to_int.__name__ = "an integer"
        return to_int
    if kind is float:

        def to_float(raw: str) -> float:
            return float(raw.strip())

        to_float.__name__ = "a number"
        return to_float

    def to_str(raw: str) -> str:
        return raw.strip()

    to_str.__name__ = "a string"
    return to_str


class EnvSettings:
    """Base of a frozen settings dataclass read from the environment (module docstring)."""

    __slots__ = ()
    # Fields that may be given as IDV_<NAME>_FILE; whether IDV_CONFIG_FILE is read.
    SECRETS: ClassVar[frozenset[str]] = frozenset()
    READS_CONFIG_FILE: ClassVar[bool] = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Precedence: built-in defaults < ``IDV_CONFIG_FILE`` (where read) < environment variables <
        explicit ``overrides``; the result is validated."""
        env = os.environ if env is None else env
        converters: dict[str, Callable[[str], Any]] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            factory: Any = f.default_factory
            default = factory() if f.default is dataclasses.MISSING else f.default
            converters[f.name] = converter(type(default))
        path = env.get(PREFIX + "CONFIG_FILE") if cls.READS_CONFIG_FILE else None
        values = read_env(env, converters, cls.SECRETS, config_file(path, converters))
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        raise NotImplementedError

    def env_names(self) -> list[str]:
        return [PREFIX + f.name.upper() for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    @classmethod
    def secret_file_names(cls) -> list[str]:
        """The ``*_FILE`` variables (secrets that may be given as a file)."""
        return sorted(f"{PREFIX}{name.upper()}_FILE" for name in cls.SECRETS)


@dataclass(frozen=True, slots=True)
class KafkaSettings(EnvSettings):
    """The broker address and the TLS/SASL fields both settings objects have: one environment configures
    the daemon and the webhook intake alike (``IDV_KAFKA_*``, checked by :mod:`consumer.security`)."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka keyword arguments for TLS/SASL (contains the password: never log it)."""
        from consumer.security import kafka_security_kwargs

        return kafka_security_kwargs(
            self.kafka_security_protocol,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username,
            self.kafka_sasl_password,
            self.kafka_ssl_cafile,
            self.kafka_ssl_certfile,
            self.kafka_ssl_keyfile,
        )


def check_logging(log_level: str, log_format: str) -> None:
    """The logging rules both settings objects share."""
    need(log_format in ("json", "text"), "log_format", "must be json or text")
    need(
        log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_level",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
