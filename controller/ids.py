"""Identifiers the controller makes for every job: job ids, upload names, request ids.

``uuid.uuid4()`` reads the kernel's random source on each call, and that read lets
go of the GIL: on a busy controller the event loop then waited for the store or a
staging thread to hand the GIL back (12 % of the loop thread's samples in bench 9,
for three ids a job).  These ids must be unique, not secret, so a generator seeded
once from the kernel (again in a forked child) makes them.
"""

from __future__ import annotations

import os
import random

_random = random.Random(os.urandom(32))


def _reseed() -> None:
    _random.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)  # a child must not repeat the parent's ids


def new_id() -> str:
    """32 lower-case hex digits, the shape of ``uuid.uuid4().hex``."""
    return f"{_random.getrandbits(128):032x}"
