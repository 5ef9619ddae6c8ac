"""The tail of an upload kept for zipfile: in memory while small, sparse file beyond."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from controller.storage.tailspool import TailSpool


@pytest.mark.parametrize("memory_limit", [1 << 20, 4])
def test_reader_sees_zeros_then_the_appended_bytes(tmp_path: Path, memory_limit: int) -> None:
    spool = TailSpool(tmp_path / "spool", 10, memory_limit=memory_limit)
    spool.append(b"abc")
    spool.append(memoryview(b"defg"))
    with spool.reader() as r:
        assert r.read() == bytes(10) + b"abcdefg"
        assert r.seek(-4, io.SEEK_END) == 13
        assert r.read(2) == b"de"
        r.seek(8)
        assert r.read(4) == b"\0\0ab"
        assert r.read(100) == b"cdefg"
        assert r.read(1) == b""
    # only past the memory limit is there a file, and it is sparse
    assert (tmp_path / "spool").exists() == (memory_limit == 4)
    spool.close()


def test_a_large_tail_is_a_sparse_file(tmp_path: Path) -> None:
    start = 1 << 30
    spool = TailSpool(tmp_path / "spool", start, memory_limit=1 << 10)
    data = os.urandom(1 << 16)
    spool.append(data)
    with spool.reader() as r:
        r.seek(start)
        assert r.read() == data
    st = (tmp_path / "spool").stat()
    assert st.st_size == start + len(data)
    assert st.st_blocks * 512 < 1 << 20  # the gigabyte before start takes no space
