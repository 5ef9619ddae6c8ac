"""FormReader: multipart/form-data bodies read part by part as they arrive."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import StreamReader

from controller.api.forms import SMALL_CHUNK_BYTES, FormBody, _receive_zip
from controller.api.multipart import (
    MAX_HEADER_LINES,
    FormReader,
    MalformedMultipart,
    boundary_of,
)
from controller.storage.zipmode import ZipUpload
from tests.support.zips import make_zip

BOUNDARY = "b0undary"


def part(headers: list[str], value: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() \
        + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


class Pieces:
    """A request body that arrives in pieces of the given sizes: ``readchunk()`` (all
    FormReader calls) returns one piece at a time, so every split is exercised."""

    def __init__(self, body: bytes, sizes: list[int]) -> None:
        self.pieces = []
        at = 0
        for size in sizes:
            if at >= len(body):
                break
            self.pieces.append(body[at:at + size])
            at += size
        if at < len(body):
            self.pieces.append(body[at:])
        self.pieces.reverse()

    async def readchunk(self) -> tuple[bytes, bool]:
        return (self.pieces.pop(), False) if self.pieces else (b"", False)


def feed(body: bytes, sizes: list[int]) -> StreamReader:
    return cast(StreamReader, Pieces(body, sizes))


async def read_all(body: bytes, sizes: list[int] | None = None,
                   chunk: int = 1 << 20) -> list[tuple[str, str | None, str, bytes]]:
    reader = FormReader(feed(body, sizes or [len(body)]), BOUNDARY)
    parts = []
    while (p := await reader.next_part()) is not None:
        data = bytearray()
        while piece := await reader.read_chunk(chunk):
            assert len(piece) <= chunk
            data += piece
        parts.append((p.name, p.filename, p.charset, bytes(data)))
    return parts


# A file whose bytes look like the start of a delimiter, and CRLFs, in many places.
TRICKY = (b"\r\n--b0undar\r\n-" + bytes(range(256)) + b"\r\n--b0und") * 50

BODY = (b"preamble text\r\n"
        + part(['Content-Disposition: form-data; name="jid"'], b"job-1")
        + part(['Content-Disposition: form-data; name="args"'], b"")
        + part(['Content-Disposition: form-data; name="args"'], b"--x\r\ny")
        + part(['Content-Disposition: form-data; name="data_file"; filename="d.zip"',
                "Content-Type: application/zip"], TRICKY)
        + part(['content-disposition: form-data; name="title"',
                "Content-Type: text/plain; charset=latin-1"], "caf\u00e9".encode("latin-1"))
        + part(["Content-Disposition: form-data; name=\"f\"; filename*=utf-8''na%C3%AFve.txt"],
               b"x")
        + END + b"epilogue\r\n")

EXPECTED = [
    ("jid", None, "utf-8", b"job-1"),
    ("args", None, "utf-8", b""),
    ("args", None, "utf-8", b"--x\r\ny"),
    ("data_file", "d.zip", "utf-8", TRICKY),
    ("title", None, "latin-1", "caf\u00e9".encode("latin-1")),
    ("f", "na\u00efve.txt", "utf-8", b"x"),
]


async def test_parts_are_the_same_however_the_body_is_split() -> None:
    rng = random.Random(7)
    assert await read_all(BODY) == EXPECTED
    assert await read_all(BODY, [1] * len(BODY)) == EXPECTED
    for _ in range(50):
        sizes = [rng.randint(1, 300) for _ in range(len(BODY))]
        assert await read_all(BODY, sizes, chunk=rng.randint(1, 5000)) == EXPECTED


async def test_a_part_not_read_is_skipped() -> None:
    reader = FormReader(feed(BODY, [97] * len(BODY)), BOUNDARY)
    names = []
    while (p := await reader.next_part()) is not None:
        names.append(p.name)
        if p.name == "data_file":
            assert await reader.read_chunk(10) == TRICKY[:10]  # then left half read
    assert names == [e[0] for e in EXPECTED]


async def test_a_part_without_headers_and_transport_padding() -> None:
    body = (f"--{BOUNDARY}  \t\r\n\r\nvalue\r\n".encode()
            + part(['Content-Disposition: form-data; name="x"'], b"1") + END)
    assert await read_all(body) == [("", None, "utf-8", b"value"), ("x", None, "utf-8", b"1")]


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "no boundary in the body"),
    (b"x" * (100 << 10), "no boundary in the first 64 KiB"),
    (part(['Content-Disposition: form-data; name="a"'], b"1"), "ends inside a part"),
    (f"--{BOUNDARY}".encode(), "ends after a boundary"),
    (f"--{BOUNDARY}junk\r\n".encode() + END, "text after a boundary"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data".encode(), "ends inside a part header"),
    (part(["X: " + "v" * 9000], b""), "part header block longer than 8192 bytes"),
    (part([f"X-{i}: v" for i in range(MAX_HEADER_LINES + 1)], b""), "more than 100 part"),
    (part(["no colon here"], b""), "bad part header line"),
    (part([" Folded: header"], b""), "bad part header line"),
    (part(["Content-Transfer-Encoding: base64"], b"eA=="), "'base64' is not supported"),
    (part(["Content-Type: multipart/mixed; boundary=z"], b""), "nested multipart"),
    (part(['Content-Disposition: form-data; name="x"; name="y"'], b""),
     "bad Content-Disposition"),
    (part(["Content-Disposition: form-data; filename*=utf-8''%FF"], b""),
     "bad Content-Disposition"),
])
async def test_broken_bodies_say_how(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMultipart, match=reason):
        await read_all(body, [4096] * (len(body) // 4096 + 1))


@pytest.mark.parametrize(("ctype", "boundary"), [
    ("multipart/form-data; boundary=abc", "abc"),
    ('multipart/form-data; charset=utf-8; BOUNDARY="a b:c"', "a b:c"),
    ("multipart/form-data;boundary=x-y_z.1", "x-y_z.1"),
    # Only a parameter named boundary: not the end of another name.
    ("multipart/form-data; xboundary=evil; boundary=good", "good"),
])
def test_boundary_of(ctype: str, boundary: str) -> None:
    assert boundary_of(ctype) == boundary


@pytest.mark.parametrize("ctype", ["multipart/form-data", "multipart/form-data; boundary=",
                                   "multipart/form-data; boundary=" + "x" * 201])
def test_a_missing_or_bad_boundary_is_refused(ctype: str) -> None:
    with pytest.raises(MalformedMultipart, match="no boundary"):
        boundary_of(ctype)


# Raw header bytes reach the app as UTF-8 with surrogates; either way the body's
# bytes could not be matched (raw 0xff was a latin-1 codec error for the client).
@pytest.mark.parametrize("boundary", ["caf\u00e9", "x\udcff"])
def test_a_boundary_that_is_not_ascii_is_refused(boundary: str) -> None:
    with pytest.raises(MalformedMultipart, match="the boundary is not ASCII"):
        boundary_of(f"multipart/form-data; boundary={boundary}")


class ScanCounter(bytearray):
    """The reader's buffer, counting the bytes its delimiter searches look at."""

    scanned = 0

    def find(self, sub: object, *span: int) -> int:  # type: ignore[override]
        start = span[0] if span else 0
        end = span[1] if len(span) > 1 else len(self)
        ScanCounter.scanned += max(min(end, len(self)) - start, 0)
        return super().find(sub, *span)  # type: ignore[arg-type]


async def test_a_big_buffer_read_in_small_chunks_is_searched_once() -> None:
    """Each read_chunk() searched all that was buffered again, so a part read 64 KiB
    at a time out of a big buffer cost time quadratic in the buffer's size."""
    data = bytes(range(256)) * (16 << 10)  # 4 MiB
    body = part(['Content-Disposition: form-data; name="f"; filename="f"'], data) + END
    reader = FormReader(feed(body, [len(body)]), BOUNDARY)
    reader._buf = ScanCounter(reader._buf)
    ScanCounter.scanned = 0
    assert await reader.next_part() is not None
    got = bytearray()
    while piece := await reader.read_chunk(64 << 10):
        got += piece
    assert got == data
    assert ScanCounter.scanned < 3 * len(body), ScanCounter.scanned


class Recorded(ZipUpload):
    """A real upload that notes how many pieces each hand-over holds."""

    pieces: list[int]

    def feed(self, chunks: Iterable[bytes]) -> None:
        chunks = list(chunks)
        self.pieces.append(len(chunks))
        super().feed(chunks)

    def hold(self, chunks: list[bytes]) -> None:
        self.pieces.append(len(chunks))
        super().hold(chunks)


async def test_a_trickled_upload_is_kept_in_few_pieces(tmp_path: Path) -> None:
    """A client sending a few bytes per packet: each was kept as its own bytes object
    until a megabyte was batched, about 40 bytes of memory per byte uploaded."""
    data = make_zip({"r.bin": random.Random(3).randbytes(60 << 10)})
    body = part(['Content-Disposition: form-data; name="data_file"; filename="d.zip"'],
                data) + END
    reader = FormReader(feed(body, [3] * len(body)), BOUNDARY)
    upload = Recorded(tmp_path / "storeBase", tmp_path / "spool", max_files=10,
                      max_bytes=1 << 30)
    upload.pieces = []
    form = FormBody()
    try:
        assert await reader.next_part() is not None
        await _receive_zip(reader, form, lambda: upload, 1 << 30)
        await asyncio.get_running_loop().run_in_executor(None, upload.finish)
        assert upload.nfiles == 1
    finally:
        await form.discard()
    assert max(upload.pieces) <= len(data) // SMALL_CHUNK_BYTES + 2, upload.pieces


class SlowDisk(ZipUpload):
    """A real upload whose writes wait for a gate: the network outruns the disk."""

    entered: threading.Event
    gate: threading.Event

    def feed(self, chunks: Iterable[bytes]) -> None:
        self.entered.set()
        self.gate.wait(5)
        super().feed(chunks)


async def test_a_cancelled_upload_is_discarded_after_its_write(tmp_path: Path) -> None:
    """Cancelled while waiting for a write (a shutdown): the wait cancelled the write's
    future, so the discard ran while the write went on, and the write's files stayed."""
    data = make_zip({"r.bin": random.Random(5).randbytes(3 << 20)})
    body = part(['Content-Disposition: form-data; name="data_file"; filename="d.zip"'],
                data) + END
    reader = FormReader(feed(body, [64 << 10] * (len(body) // (64 << 10) + 1)), BOUNDARY)
    upload = SlowDisk(tmp_path / "storeBase", tmp_path / "spool", max_files=10,
                      max_bytes=1 << 30)
    upload.entered, upload.gate = threading.Event(), threading.Event()
    form = FormBody()

    async def receive() -> None:  # as read_form does
        try:
            await _receive_zip(reader, form, lambda: upload, 1 << 30)
        except BaseException:
            await form.discard()
            raise

    assert await reader.next_part() is not None
    task = asyncio.create_task(receive())
    for _ in range(500):  # 5 s at most
        if upload.entered.is_set():
            break
        await asyncio.sleep(0.01)
    task.cancel()  # the task waits for the write: the reader never suspends
    await asyncio.sleep(0.1)
    upload.gate.set()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    assert not upload.staging.exists() and not upload.spool.exists()
