"""Zip payloads for tests: a ``data_file`` as python-pfconclient would send it."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping


def make_zip(files: Mapping[str, bytes | str]) -> bytes:
    """A deflated zip of ``files`` (name -> content), in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()
