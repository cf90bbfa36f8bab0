"""``idv-publish``: put verification requests on the Kafka topic.

::

    idv-publish one --operation aml_screening --subject applicant-42 --request '{"full_name": "..."}'
    idv-publish one --operation id_verification --subject applicant-42 \\
        --request '{"document_type": "passport"}' --document front_image=./front.jpg
    idv-publish file requests.jsonl          # or "-" for standard input
    idv-publish samples --count 10000 --duplicates 0.1 --seed 7

Exit status: 0 when everything was published, 1 when some input was invalid (reported and skipped),
2 on a usage error or when the broker failed. Human-readable progress and the summary go to stderr;
``--json`` prints the summary as one JSON object on stdout instead.
"""

from __future__ import annotations

import codecs
import functools
import logging
import os
import secrets
import ssl
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click
import orjson

from producer.documents import DEFAULT_MAX_BYTES as DEFAULT_DOCUMENT_BYTES
from producer.documents import DocumentFileError, store_local_document
from producer.envelope import (
    DOCUMENT_KEY,
    OPERATIONS,
    Envelope,
    check_exact_integers,
    encode,
    envelope_from_dict,
    load_json,
)
from producer.errors import EnvelopeError
from producer.publisher import DEFAULT_BOOTSTRAP, DEFAULT_TOPIC, Publisher, PublishResult, new_envelope
from producer.runs import EXIT_INVALID, DuplicateCounter, Progress, Summary, publish_all, run_command
from producer.samples import iter_sample_envelopes

__all__ = ["main"]

log = logging.getLogger(__name__)


F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Connection:
    bootstrap: str
    topic: str
    security_protocol: str
    sasl_mechanism: str | None
    sasl_username: str | None
    sasl_password: str | None = field(repr=False)
    ssl_cafile: str | None

    def publisher(self) -> Publisher:
        context: ssl.SSLContext | None = None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
        return Publisher(
            [host.strip() for host in self.bootstrap.split(",") if host.strip()],
            self.topic,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_plain_username=self.sasl_username,
            sasl_plain_password=self.sasl_password,
            ssl_context=context,
        )


_CONNECTION_OPTIONS = tuple(f.name for f in fields(Connection) if f.name != "sasl_password")


def _sasl_password() -> str | None:
    # Only from the environment or a file: a command-line argument would show in `ps`.
    path = os.environ.get("IDV_KAFKA_SASL_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise click.UsageError(
                f"IDV_KAFKA_SASL_PASSWORD_FILE: cannot read {path!r}: {exc.strerror}"
            ) from None
    return os.environ.get("IDV_KAFKA_SASL_PASSWORD")


def _env_option(flag: str, envvar: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option also read from ``envvar`` (shown in ``--help``)."""
    return click.option(flag, envvar=envvar, show_envvar=True, **kwargs)


def _common_options(func: F) -> F:
    options = [
        _env_option(
            "--bootstrap",
            "IDV_KAFKA_BOOTSTRAP",
            default=DEFAULT_BOOTSTRAP,
            show_default=True,
            help="Kafka bootstrap servers, comma-separated host:port.",
        ),
        _env_option(
            "--topic",
            "IDV_TOPIC",
            default=DEFAULT_TOPIC,
            show_default=True,
            help="Topic to publish to (must exist).",
        ),
        _env_option(
            "--security-protocol",
            "IDV_KAFKA_SECURITY_PROTOCOL",
            type=click.Choice(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
            default="PLAINTEXT",
            show_default=True,
        ),
        _env_option(
            "--sasl-mechanism",
            "IDV_KAFKA_SASL_MECHANISM",
            type=click.Choice(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]),
            help="SASL mechanism; the password comes from IDV_KAFKA_SASL_PASSWORD or "
            "IDV_KAFKA_SASL_PASSWORD_FILE, never from the command line.",
        ),
        _env_option("--sasl-username", "IDV_KAFKA_SASL_USERNAME"),
        _env_option(
            "--ssl-cafile",
            "IDV_KAFKA_SSL_CAFILE",
            type=click.Path(exists=True, dir_okay=False),
            help="CA bundle for SSL / SASL_SSL (default: the system's).",
        ),
        click.option("--json", "json_output", is_flag=True, help="Print the summary as JSON on stdout."),
        click.option("-v", "--verbose", is_flag=True, help="Log the Kafka client's warnings to stderr."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, verbose: bool, **kwargs: Any) -> Any:
        _configure_logging(verbose)
        # The options above are named as Connection's fields; the password alone never is an option.
        given = {name: kwargs.pop(name) for name in _CONNECTION_OPTIONS}
        connection = Connection(**given, sasl_password=_sasl_password())
        return func(*args, connection=connection, **kwargs)

    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def _configure_logging(verbose: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka logs every connection retry; our own error line says what failed. Never DEBUG: aiokafka's
    # producer logs record values (personal data) at that level.
    logging.getLogger("aiokafka").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    logging.getLogger("producer").setLevel(logging.DEBUG if verbose else logging.WARNING)


def parse_line(line: bytes) -> Envelope:
    """One JSON Lines record → envelope; :class:`EnvelopeError` without echoing the line."""
    obj = load_json(line, "line")
    check_exact_integers(line, obj)
    return envelope_from_dict(obj)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Publish identity-verification requests to Kafka, exactly as the consumer expects them.

    Exit status: 0 all published, 1 some input invalid (skipped, reported on stderr as
    "line N: <reason>: <detail>"), 2 usage error or broker failure.
    """


@main.command()
@click.option(
    "--operation", required=True, type=click.Choice(sorted(OPERATIONS)), help="The kind of request."
)
@click.option("--subject", "subject_id", required=True, help="Subject (applicant) ID; the Kafka key.")
@click.option("--request", "request_json", required=True, help="Request body as a JSON object.")
@click.option(
    "--message-id",
    help="Idempotency anchor. Pass the same ID when re-sending the same business request; "
    "default: a new UUIDv7.",
)
@click.option("--correlation-id", help="Upstream tracing ID.")
@click.option(
    "--document",
    "documents",
    multiple=True,
    metavar="FIELD=PATH",
    help="Store the image file PATH in the local document source and put its reference in the request "
    "field FIELD (e.g. front_image=./front.jpg); repeatable. The image never goes into the message.",
)
@_env_option(
    "--documents-dir",
    "IDV_DOCUMENTS_DIR",
    default=".run/documents",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The local document source's directory (the daemon's IDV_DOCUMENTS_DIR).",
)
@_env_option(
    "--documents-max-bytes",
    "IDV_DOCUMENTS_MAX_BYTES",
    default=DEFAULT_DOCUMENT_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest document accepted (the daemon's IDV_DOCUMENTS_MAX_BYTES).",
)
@_common_options
def one(
    operation: str,
    subject_id: str,
    request_json: str,
    message_id: str | None,
    correlation_id: str | None,
    documents: tuple[str, ...],
    documents_dir: Path,
    documents_max_bytes: int,
    connection: Connection,
    json_output: bool,
) -> None:
    """Publish one request and print where it was stored."""
    try:
        request = orjson.loads(request_json)
    except orjson.JSONDecodeError:
        raise click.BadParameter("not valid JSON", param_hint="--request") from None
    if not isinstance(request, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--request")
    try:
        check_exact_integers(request_json, request)
    except EnvelopeError as exc:
        raise click.BadParameter(exc.detail, param_hint="--request") from None
    summary = Summary("one", connection.topic)
    if documents:
        stored = _store_documents(operation, request, documents, documents_dir, documents_max_bytes)
        summary.extra["documents"] = stored
        if not json_output:
            for name, uri in stored.items():
                click.echo(f"stored {name} as {uri}", err=True)
    try:
        envelope = new_envelope(
            operation, request, subject_id, message_id=message_id, correlation_id=correlation_id
        )
        encode(envelope)
    except EnvelopeError as exc:
        click.echo(f"invalid: {exc.reason}: {exc.detail}", err=True)
        summary.invalid = 1
        summary.emit(json_output)
        sys.exit(EXIT_INVALID)

    async def publish(progress: Progress) -> None:
        async with connection.publisher() as publisher:
            result: PublishResult = await publisher.publish_envelope(envelope)
        summary.published = 1
        progress.update(1)
        summary.extra.update(message_id=result.message_id, partition=result.partition, offset=result.offset)
        if not json_output:
            click.echo(
                f"published {result.message_id} to {result.topic}[{result.partition}]@{result.offset}",
                err=True,
            )

    run_command(summary, json_output, publish, total=1)


def _store_documents(
    operation: str, request: dict[str, Any], specs: tuple[str, ...], root: Path, max_bytes: int
) -> dict[str, str]:
    """``--document FIELD=PATH``: store each file in the local source, set ``request[FIELD]`` to its
    reference; ``field -> uri``. Checked before anything is stored: image fields of the operation only,
    each once, not also given in ``--request``."""
    fields = OPERATIONS[operation].documents
    wanted: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected FIELD=PATH, got {spec!r}", param_hint="--document")
        if name not in fields:
            allowed = ", ".join(fields) or "none"
            raise click.BadParameter(
                f"{name!r} is not an image field of {operation} (its image fields: {allowed})",
                param_hint="--document",
            )
        if name in wanted or name in request:
            raise click.BadParameter(f"{name} is given more than once", param_hint="--document")
        wanted[name] = Path(path)
    stored: dict[str, str] = {}
    for name, file in wanted.items():
        try:
            uri = store_local_document(file, root, max_bytes=max_bytes)
        except DocumentFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--document") from None
        request[name] = {DOCUMENT_KEY: uri}
        stored[name] = uri
    return stored


@main.command("file")
@click.argument("path", type=click.File("rb"))
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first invalid line (the lines before it are published, none after).",
)
@_common_options
def file_command(path: IO[bytes], fail_fast: bool, connection: Connection, json_output: bool) -> None:
    """Publish the requests in a JSON Lines file (PATH, or - for standard input).

    Each line is an object with "operation", "subject_id", "request" and optionally "message_id" and
    "correlation_id". A line without "message_id" gets a new one, so publishing the same file twice then
    yields new requests; give IDs to make a re-run a replay. Blank lines are skipped.
    """
    summary = Summary("file", connection.topic)
    duplicates = DuplicateCounter()

    def valid_envelopes(progress: Progress) -> Iterable[Envelope]:
        for lineno, raw in enumerate(path, start=1):
            line = raw.strip()
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line:
                continue
            try:
                envelope = parse_line(line)
                encode(envelope)
            except EnvelopeError as exc:
                summary.invalid += 1
                progress.note(f"line {lineno}: {exc.reason}: {exc.detail}")
                if fail_fast:
                    return
                continue
            duplicates.add(envelope.message_id)
            summary.duplicate_ids = duplicates.count
            yield envelope

    async def publish(progress: Progress) -> None:
        async with connection.publisher() as publisher:
            await publish_all(publisher, valid_envelopes(progress), summary, progress)

    run_command(summary, json_output, publish, total=None)


@main.command()
@click.option("--count", required=True, type=click.IntRange(min=0), help="How many envelopes.")
@click.option(
    "--duplicates",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Share of envelopes that repeat an earlier one (same message ID and payload).",
)
@click.option(
    "--seed",
    type=int,
    help="Makes the output reproducible (same IDs and payloads: a replay); default: a random seed, "
    "printed in the summary.",
)
@click.option(
    "--decision-mix/--no-decision-mix",
    default=True,
    show_default=True,
    help="Put DECLINE / REVIEW tokens in some requests so the sandbox varies its decision.",
)
@_common_options
def samples(
    count: int,
    duplicates: float,
    seed: int | None,
    decision_mix: bool,
    connection: Connection,
    json_output: bool,
) -> None:
    """Publish COUNT synthetic requests across the three operations."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    summary = Summary("samples", connection.topic, extra={"seed": seed})
    counter = DuplicateCounter()

    def envelopes() -> Iterable[Envelope]:
        for envelope in iter_sample_envelopes(
            count,
            seed=seed,
            duplicate_ratio=duplicates,
            decision_mix=decision_mix,
            start=datetime.now(UTC),
        ):
            counter.add(envelope.message_id)
            summary.duplicate_ids = counter.count
            yield envelope

    async def publish(progress: Progress) -> None:
        async with connection.publisher() as publisher:
            await publish_all(publisher, envelopes(), summary, progress)

    run_command(summary, json_output, publish, total=count)


if __name__ == "__main__":
    main(prog_name="idv-publish")
