"""Reading and validating pfcon's form bodies.

pfcon's job endpoints read form fields only (url-encoded or multipart, lists as
repeated keys) and report every bad field at once as ``{"message": {field: reason}}``
with Flask-RESTful's reason strings.  This module reproduces those shapes and adds
the checks pfcon leaves to its backends (job ids, negative limits).

Multipart bodies are read part by part: text parts are size-capped, and the
``data_file`` part is unpacked as it arrives (:class:`ZipUpload`), never held in
memory.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from controller.api.multipart import FormReader, boundary_of
from controller.errors import BadRequest, PayloadTooLarge
from controller.storage.zipmode import ZipUpload

MISSING_FORM = "Missing required parameter in the post body"
JID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
JID_RULE = ("must start with a letter or digit and contain only letters, digits, '_', '.' "
            "and '-' (at most 128 characters)")

MAX_TEXT_FIELDS_BYTES = 4 << 20  # all text parts of one request together
FEED_BYTES = 1 << 20  # hand the unpacker about this much at a time
SMALL_CHUNK_BYTES = 4 << 10  # smaller network chunks are joined before they are kept


@dataclass(frozen=True)
class Field:
    name: str
    kind: Literal["str", "int", "list", "choice", "jid"]
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()


# In pfcon's parser order: a bundle lists the bad fields in this order.
PLUGIN_FIELDS = (
    Field("jid", "jid", required=True),
    Field("args", "list", default=[]),
    Field("args_path_flags", "list", default=[]),
    Field("auid", "str", required=True),
    Field("number_of_workers", "int", required=True),
    Field("cpu_limit", "int", required=True),
    Field("memory_limit", "int", required=True),
    Field("gpu_limit", "int", required=True),
    Field("image", "str", required=True),
    Field("entrypoint", "list", required=True),
    Field("type", "choice", required=True, choices=("ds", "fs", "ts")),
    Field("env", "list", default=[]),
    Field("input_dirs", "list", default=None),
    Field("output_dir", "str", default=None),
)
COPY_FIELDS = (
    Field("jid", "jid", required=True),
    Field("input_dirs", "list", default=[]),
    Field("output_dir", "str", required=True),
    Field("cpu_limit", "int", default=1000),
    Field("memory_limit", "int", default=300),
)
UPLOAD_FIELDS = (
    Field("jid", "jid", required=True),
    Field("job_output_path", "str", required=True),
    Field("cpu_limit", "int", default=1000),
    Field("memory_limit", "int", default=300),
)
DELETE_FIELDS = (
    Field("jid", "jid", required=True),
    Field("cpu_limit", "int", default=1000),
    Field("memory_limit", "int", default=300),
)


def normalize_jid(value: str) -> str:
    """pfcon strips the leading '/' of a jid."""
    return value.lstrip("/")


def valid_jid(jid: str) -> bool:
    return JID_PATTERN.fullmatch(jid) is not None


def parse_fields(form: Mapping[str, list[str]], fields: tuple[Field, ...]) -> dict[str, Any]:
    """Type-check every field; raise one ``BadRequest`` bundle listing all bad ones."""
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    for f in fields:
        values = form.get(f.name)
        if not values:
            if f.required:
                errors[f.name] = MISSING_FORM
            out[f.name] = list(f.default) if isinstance(f.default, list) else f.default
            continue
        if f.kind == "list":
            out[f.name] = list(values)
            continue
        value = values[0]
        if f.kind == "int":
            try:
                number = int(value)
            except ValueError as exc:
                errors[f.name] = str(exc)
                continue
            if number < 0:
                errors[f.name] = f"must not be negative, got {number}"
                continue
            out[f.name] = number
        elif f.kind == "choice":
            if value not in f.choices:
                errors[f.name] = f"{value} is not a valid choice"
                continue
            out[f.name] = value
        elif f.kind == "jid":
            jid = normalize_jid(value)
            if not valid_jid(jid):
                errors[f.name] = f"{JID_RULE}, got {value!r}"
                continue
            out[f.name] = jid
        else:
            out[f.name] = value
    if errors:
        raise BadRequest(errors)
    return out


@dataclass
class FormBody:
    """The fields of one request and, when sent, its ``data_file`` being unpacked."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    upload: ZipUpload | None = None

    async def discard(self) -> None:
        """Remove what is left of the upload (blocking work off the loop)."""
        if self.upload is not None:
            upload, self.upload = self.upload, None
            if upload.leaves_files:
                await asyncio.get_running_loop().run_in_executor(None, upload.discard)


UploadFactory = Callable[[], ZipUpload]


def media_type(request: web.Request) -> str:
    """The request's media type, lower-cased, without parameters (what
    ``request.content_type`` says, without its general header parser's cost)."""
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


async def read_form(request: web.Request, new_upload: UploadFactory | None,
                    max_upload_bytes: int) -> FormBody:
    """Read a url-encoded or multipart body.

    With ``new_upload`` set, a ``data_file`` part is unpacked as it arrives into the
    upload it makes (refused with 413 past ``max_upload_bytes``); without it the
    part is drained and ignored (in-network modes ignore the part
    python-pfconclient's CLI always sends).  The caller owns the upload: await
    ``FormBody.discard()`` when done.
    """
    body = FormBody()
    ctype = media_type(request)
    if ctype == "multipart/form-data":
        try:
            await _read_multipart(request, body, new_upload, max_upload_bytes)
        except BaseException:
            await body.discard()
            raise
        return body
    if ctype == "application/x-www-form-urlencoded":
        try:
            post = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge("request body too large for a form") from None
        except (UnicodeDecodeError, LookupError) as exc:  # raw non-UTF-8 bytes, unknown charset
            raise BadRequest(f"malformed form body: {exc}") from None
        for key in post:
            body.fields[key] = [v for v in post.getall(key) if isinstance(v, str)]
        return body
    # Anything else (JSON, no body) has no form fields: every required one is missing.
    return body


# A body that breaks the format (MalformedMultipart is a ValueError), or a broken
# chunked transfer encoding under it.
_MALFORMED = (ValueError, HttpProcessingError)


def _bad_body(exc: ValueError | HttpProcessingError) -> BadRequest:
    """The 400 (not a 500) that answers the client's broken multipart body.  Raised
    from a plain ``except``: a context manager around every read of every part cost
    more than the read."""
    reason = exc.message if isinstance(exc, HttpProcessingError) else exc
    return BadRequest(f"malformed multipart body: {reason}")


async def _read_multipart(request: web.Request, body: FormBody,
                          new_upload: UploadFactory | None, max_upload_bytes: int) -> None:
    try:
        reader = FormReader(request.content, boundary_of(request.headers["Content-Type"]))
    except _MALFORMED as exc:
        raise _bad_body(exc) from None
    text_bytes = 0
    # The url-encoded field cap applies to parts too (Werkzeug's max_form_parts is the
    # same 1000): without it, empty parts cost memory and time the byte cap never sees.
    max_parts = request.client_max_fields
    for count in itertools.count(1):
        try:
            part = await reader.next_part()
        except _MALFORMED as exc:
            raise _bad_body(exc) from None
        if part is None:
            return
        if count > max_parts:
            raise PayloadTooLarge(f"more than {max_parts} form parts")
        if count % 64 == 0:
            # Reading parts already buffered never suspends: without this, a body of
            # many small parts held the event loop for its whole parse.
            await asyncio.sleep(0)
        # Only parts with a filename are files (Werkzeug's rule): a plain text part
        # named data_file is a form field, so pfcon answers "no data_file".
        if part.filename is not None:
            if part.name == "data_file" and new_upload is not None and body.upload is None:
                await _receive_zip(reader, body, new_upload, max_upload_bytes)
            else:
                await _drain(reader)
            continue
        raw = bytearray()
        while chunk := await _read_chunk(reader, 64 << 10):  # capped as it arrives
            text_bytes += len(chunk)
            if text_bytes > MAX_TEXT_FIELDS_BYTES:
                raise PayloadTooLarge(
                    f"form fields larger than {MAX_TEXT_FIELDS_BYTES >> 20} MiB")
            raw += chunk
        try:
            text = raw.decode(part.charset)
        except (LookupError, UnicodeDecodeError):
            raise BadRequest({part.name: "not valid text"}) from None
        body.fields.setdefault(part.name, []).append(text)


async def _read_chunk(reader: FormReader, size: int) -> bytes:
    try:
        return await reader.read_chunk(size)
    except _MALFORMED as exc:
        raise _bad_body(exc) from None


async def _drain(reader: FormReader) -> None:
    while await _read_chunk(reader, FEED_BYTES):
        pass


async def _receive_zip(reader: FormReader, body: FormBody, new_upload: UploadFactory,
                       max_upload_bytes: int) -> None:
    """Feed the part to a new upload, reading the next megabyte from the network
    while a worker thread writes the previous one."""
    loop = asyncio.get_running_loop()
    upload = body.upload = new_upload()
    received = 0
    writing: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batch_bytes = 0
    # A client trickling a few bytes per packet gets chunks that small: in a list,
    # each cost about 40 bytes of memory per byte of data, so they are joined here.
    small = bytearray()
    try:
        while True:
            chunk = await _read_chunk(reader, FEED_BYTES)
            if chunk:
                received += len(chunk)
                if received > max_upload_bytes:
                    raise PayloadTooLarge(
                        f"data_file: upload larger than {max_upload_bytes >> 20} MiB")
                if len(chunk) < SMALL_CHUNK_BYTES:
                    small += chunk
                    if len(small) < SMALL_CHUNK_BYTES:
                        continue
                    chunk = bytes(small)
                    small.clear()
                elif small:
                    batch.append(bytes(small))
                    batch_bytes += len(small)
                    small.clear()
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes < FEED_BYTES:
                    continue
            elif small:  # the body's end: the joined tail goes with the last piece
                batch.append(bytes(small))
                small.clear()
            if writing is not None:
                # Shielded: a cancel here cancelled the write's future while the
                # write went on, and the finally below let the discard run beside it.
                await asyncio.shield(writing)
                writing = None
            if batch and not chunk:
                # The last piece is written by the worker call that completes the
                # upload: one hand-over fewer, and a small upload in a refused
                # request never reaches the disk.
                upload.hold(batch)
            elif batch:
                writing = loop.run_in_executor(None, upload.feed, batch)
                batch, batch_bytes = [], 0
            if not chunk:
                break
    finally:
        if writing is not None:
            await asyncio.shield(writing)  # never discard under a running writer
