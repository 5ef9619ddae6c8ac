"""A streaming reader for ``multipart/form-data`` request bodies.

aiohttp's general multipart reader costs about 0.1 ms of CPU per part on a small
VM (it re-parses every part's Content-Disposition with its full RFC 2231 parser
to look for a ``_charset_`` field, and builds a header multidict per part).  A
CUBE job POST has about twenty parts, which made the form the largest cost of a
submit.  This reader handles only what a form body needs: parts with a name, an
optional filename and charset, read in chunks as they arrive, never held whole.

Like Werkzeug (pfcon's parser), it gives ``_charset_`` no meaning.  Unlike it,
it refuses what it does not decode: a part with a Content-Transfer-Encoding
other than the identity ones, or a nested multipart part.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from aiohttp import StreamReader
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

MAX_HEADER_BYTES = 8 << 10  # one part's header block
MAX_HEADER_LINES = 100
MAX_PREAMBLE_BYTES = 64 << 10
_IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")
_PLAIN_DISPOSITION = re.compile(
    r'form-data;\s*name="([^"\\]*)"(?:;\s*filename="([^"\\]*)")?\s*')
# RFC 2046 says at most 70 characters; Werkzeug sets no limit, so some room is left.
# A parameter starts after a ";": "xboundary=" is not one.
_BOUNDARY = re.compile(
    r""";\s*boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))(?:[\s;]|$)""", re.IGNORECASE)
_CHARSET = re.compile(r"""charset=(?:"([^"]*)"|([^\s;"]+))""", re.IGNORECASE)


class MalformedMultipart(ValueError):
    """The body breaks the multipart format (the message says how)."""


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a request's Content-Type."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MalformedMultipart("no boundary in the Content-Type")
    boundary = match.group(1) or match.group(2)
    if not boundary.isascii():  # header bytes reach us decoded: no sure way back
        raise MalformedMultipart("the boundary is not ASCII")
    return boundary


@dataclass
class FormPart:
    name: str
    filename: str | None
    charset: str


class FormReader:
    """Parts of one body, in order: ``next_part()``, then ``read_chunk()`` until it
    returns ``b""``; a part not read to its end is skipped by the next call."""

    def __init__(self, content: StreamReader, boundary: str) -> None:
        self._content = content
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # The first boundary has no line break before it: lend it one, so every
        # boundary is found the same way.
        self._buf = bytearray(b"\r\n")
        # Bytes at the buffer's start known to be part data: read_chunk() searches
        # for the delimiter once per network read, not once per call (a read of
        # hundreds of KiB is handed on 64 KiB at a time).
        self._data_ahead = 0
        self._in_part = False
        self._closed = False

    async def next_part(self) -> FormPart | None:
        """The next part's headers, or None after the closing boundary."""
        if self._closed:
            return None
        if self._in_part:
            while await self.read_chunk(1 << 20):
                pass
            self._in_part = False
        else:
            await self._skip_preamble()
        del self._buf[:len(self._delimiter)]
        await self._fill(2)
        if self._buf.startswith(b"--"):
            self._closed = True  # the epilogue after it is ignored, as RFC 2046 says
            return None
        end = await self._find(b"\r\n", 1024, "boundary line")
        if self._buf[:end].strip(b" \t"):
            raise MalformedMultipart("text after a boundary")
        del self._buf[:end + 2]
        part = self._part(await self._headers())
        self._in_part = True
        return part

    async def read_chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes of the current part; ``b""`` at its end."""
        if not self._in_part:
            return b""
        keep = len(self._delimiter) - 1  # a boundary may start in the last bytes
        while not self._data_ahead:
            at = self._buf.find(self._delimiter)
            if at == 0:
                self._in_part = False  # the boundary stays for next_part()
                return b""
            self._data_ahead = at if at > 0 else max(len(self._buf) - keep, 0)
            if not self._data_ahead:
                await self._more("the body ends inside a part")
        n = min(self._data_ahead, size)
        with memoryview(self._buf) as view:  # one copy, not two
            chunk = bytes(view[:n])
        del self._buf[:n]
        self._data_ahead -= n
        return chunk

    async def _skip_preamble(self) -> None:
        """Drop what comes before the first boundary (bounded)."""
        dropped = 0
        while (at := self._buf.find(self._delimiter)) < 0:
            surplus = len(self._buf) - len(self._delimiter)
            if surplus > 0:
                dropped += surplus
                del self._buf[:surplus]
            if dropped > MAX_PREAMBLE_BYTES:
                raise MalformedMultipart("no boundary in the first 64 KiB")
            await self._more("no boundary in the body")
        del self._buf[:at]

    async def _headers(self) -> dict[str, str]:
        await self._fill(2)
        if self._buf.startswith(b"\r\n"):  # a part without headers
            del self._buf[:2]
            return {}
        end = await self._find(b"\r\n\r\n", MAX_HEADER_BYTES, "part header block")
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[:end + 4]
        if len(lines) > MAX_HEADER_LINES:
            raise MalformedMultipart(f"more than {MAX_HEADER_LINES} part headers")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise MalformedMultipart(f"bad part header line {line[:80]!r}")
            headers[name.decode("latin-1").lower()] = value.strip().decode("utf-8", "replace")
        return headers

    @staticmethod
    def _part(headers: dict[str, str]) -> FormPart:
        encoding = headers.get("content-transfer-encoding", "").lower()
        if encoding not in _IDENTITY_ENCODINGS:
            raise MalformedMultipart(f"Content-Transfer-Encoding {encoding!r} is not supported")
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/"):
            raise MalformedMultipart("nested multipart parts are not supported")
        charset = _CHARSET.search(ctype)
        disposition = headers.get("content-disposition", "")
        plain = _PLAIN_DISPOSITION.fullmatch(disposition)
        if plain is not None:
            name, filename = plain.group(1), plain.group(2)
        else:  # escaped quotes, RFC 2231 filename*=: the general parser
            with warnings.catch_warnings(record=True) as problems:
                warnings.simplefilter("always")  # it warns instead of raising
                _, params = parse_content_disposition(disposition or None)
                filename = content_disposition_filename(params, "filename")
            if problems:
                raise MalformedMultipart(f"bad Content-Disposition {disposition[:80]!r}")
            name = params.get("name", "")
        return FormPart(name, filename,
                        (charset.group(1) or charset.group(2)) if charset else "utf-8")

    async def _find(self, needle: bytes, limit: int, what: str) -> int:
        while (at := self._buf.find(needle, 0, limit + len(needle))) < 0:
            if len(self._buf) >= limit + len(needle):
                raise MalformedMultipart(f"{what} longer than {limit} bytes")
            await self._more(f"the body ends inside a {what}")
        return at

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            await self._more("the body ends after a boundary")

    async def _more(self, reason: str) -> None:
        # One network read at a time: readany() joins all that is buffered (up to
        # 8 MiB with the controller's read buffer), a copy that cost two thirds of
        # the upload throughput.
        while True:
            data, end_of_http_chunk = await self._content.readchunk()
            if data:
                break
            if not end_of_http_chunk:  # the end of the body, not of an HTTP chunk
                raise MalformedMultipart(reason)
        self._buf += data
