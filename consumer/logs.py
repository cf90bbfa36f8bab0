"""Log context and the daemon's JSON log format.

Library code only calls ``logging.getLogger(__name__)``; :func:`configure` is called by the CLI.
:data:`message_context` carries topic/partition/offset/message ID/key hash of the message being handled
and :class:`ContextFilter` stamps them on every record, so a line can be traced without ever logging
the payload.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

__all__ = [
    "ContextFilter",
    "FirstStartNoise",
    "JsonFormatter",
    "configure",
    "log_unexpected",
    "message_context",
    "position",
]

message_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "idv_message_context", default=None
)


def position(msg: Any) -> dict[str, Any]:
    """A record's place (topic, partition, offset) as a log line's ``extra``: never its key or value."""
    return {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}


def log_unexpected(logger: logging.Logger, exc: BaseException, msg: Any, doing: str) -> None:
    """A bug met while ``doing`` something with one record: the exception's type and the record's place,
    never the record (nor the exception's text, which may quote it)."""
    logger.error("unexpected %s while %s", type(exc).__name__, doing, extra=position(msg))


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = message_context.get()
        if ctx:
            for key, value in ctx.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


class FirstStartNoise(logging.Filter):
    """Downgrades aiokafka's first-start coordinator noise to DEBUG during the first ``window_s`` seconds
    of the process: the ERROR ``Group Coordinator Request failed: … CoordinatorNotAvailableError`` and the
    WARNING ``Marking the coordinator dead …`` that follows it.

    On a fresh broker the ``__consumer_offsets`` topic is created by the first group that asks for a
    coordinator; until it is, aiokafka logs those lines and retries, and the group joins a second later.
    They would be the first thing a newcomer reads after ``make run`` and mean nothing. Later occurrences
    (the coordinator lost while running) keep their level.
    """

    _NOT_AVAILABLE = ("GroupCoordinatorNotAvailableError", "CoordinatorNotAvailableError")

    def __init__(self, window_s: float = 60.0) -> None:
        super().__init__()
        self.until = time.monotonic() + window_s

    def _noise(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return False
        if record.msg == "Group Coordinator Request failed: %s":
            args = record.args if isinstance(record.args, tuple) else ()
            return bool(args) and type(args[0]).__name__ in self._NOT_AVAILABLE
        return isinstance(record.msg, str) and record.msg.startswith("Marking the coordinator dead")

    def filter(self, record: logging.LogRecord) -> bool:
        if self._noise(record) and time.monotonic() < self.until:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("aiokafka").isEnabledFor(logging.DEBUG)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = getattr(record, "_text", None)  # a line written for people (e.g. the run summary)
        if isinstance(text, str):
            plain = logging.makeLogRecord({k: v for k, v in vars(record).items() if k in _STANDARD})
            plain.msg, plain.args = text, None
            return super().format(plain)
        line = super().format(record)
        ctx = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(FirstStartNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about group membership: in JSON (machines) keep it, but not its DEBUG; in
    # text (a person at a terminal) only its warnings, unless IDV_LOG_LEVEL=DEBUG.
    quiet = logging.WARNING if fmt == "text" and root.level > logging.DEBUG else logging.INFO
    logging.getLogger("aiokafka").setLevel(max(quiet, root.level))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
