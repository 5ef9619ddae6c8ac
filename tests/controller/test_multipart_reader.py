"""FormReader: multipart/form-data bodies read part by part as they arrive."""

from __future__ import annotations

import random
from typing import cast

import pytest
from aiohttp import StreamReader

from controller.api.multipart import (
    MAX_HEADER_LINES,
    FormReader,
    MalformedMultipart,
    boundary_of,
)

BOUNDARY = "b0undary"


def part(headers: list[str], value: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() \
        + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


class Pieces:
    """A request body that arrives in pieces of the given sizes: ``readany()`` (all
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

    async def readany(self) -> bytes:
        return self.pieces.pop() if self.pieces else b""


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
])
async def test_broken_bodies_say_how(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMultipart, match=reason):
        await read_all(body, [4096] * (len(body) // 4096 + 1))


@pytest.mark.parametrize(("ctype", "boundary"), [
    ("multipart/form-data; boundary=abc", "abc"),
    ('multipart/form-data; charset=utf-8; BOUNDARY="a b:c"', "a b:c"),
    ("multipart/form-data;boundary=x-y_z.1", "x-y_z.1"),
])
def test_boundary_of(ctype: str, boundary: str) -> None:
    assert boundary_of(ctype) == boundary


@pytest.mark.parametrize("ctype", ["multipart/form-data", "multipart/form-data; boundary=",
                                   "multipart/form-data; boundary=" + "x" * 201])
def test_a_missing_or_bad_boundary_is_refused(ctype: str) -> None:
    with pytest.raises(MalformedMultipart, match="no boundary"):
        boundary_of(ctype)
