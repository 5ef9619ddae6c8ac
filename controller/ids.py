"""Identifiers the controller makes for every job: job ids, upload names, request ids.

``uuid.uuid4()`` reads the kernel's random source on each call, and that read lets
go of the GIL: on a busy controller the event loop then waited for the store or a
staging thread to hand the GIL back (12 % of the loop thread's samples in bench 9,
for three ids a job).  Here one read serves 256 ids; they stay unpredictable
(agents see them).  A forked child starts on a read of its own.
"""

from __future__ import annotations

import os
import threading

_ID_BYTES = 16
_POOL_BYTES = 256 * _ID_BYTES

_lock = threading.Lock()  # staging threads make ids too
_pool = b""
_used = _POOL_BYTES


def _forget_pool() -> None:
    global _pool, _used
    _pool, _used = b"", _POOL_BYTES


os.register_at_fork(after_in_child=_forget_pool)  # a child must not repeat the parent's ids


def new_id() -> str:
    """32 lower-case hex digits of kernel randomness, the shape of ``uuid4().hex``."""
    global _pool, _used
    with _lock:
        if _used >= _POOL_BYTES:
            _pool, _used = os.urandom(_POOL_BYTES), 0
        start = _used
        _used += _ID_BYTES
        pool = _pool
    return pool[start:start + _ID_BYTES].hex()
