"""Built-in data operations (DESIGN §3): the work pfcon ran in op containers.

They run inside the agent, next to the storeBase, with no image to pull.  Each
operation is idempotent, so the agent can simply run it again after a restart.
Only paths under the agent's storeBase view are ever touched.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("pfleet.agent.ops")

KEY_DIR = re.compile(r"key-[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class OpError(Exception):
    """The operation failed; the message is reported with the job."""


def run_op(op: dict[str, Any], storebase: Path) -> str:
    """Run one operation (blocking; call from an executor); return its log text."""
    kind = op.get("op")
    if kind == "delete":
        return delete_key_dir(storebase, str(op.get("key_dir", "")))
    raise OpError(f"unknown operation {kind!r}")


def delete_key_dir(storebase: Path, key_dir: str) -> str:
    """Remove ``storeBase/key-<jid>`` and everything in it."""
    if not KEY_DIR.fullmatch(key_dir):
        raise OpError(f"refusing to delete {key_dir!r}: not a job key directory")
    target = storebase / key_dir
    if target.is_symlink():
        raise OpError(f"refusing to delete {key_dir!r}: it is a symbolic link")
    if not target.exists():
        return f"{key_dir} already absent\n"
    errors: list[str] = []
    shutil.rmtree(target, onerror=lambda _f, path, exc: errors.append(f"{path}: {exc[1]}"))
    if errors:
        raise OpError("could not delete everything: " + "; ".join(errors[:5]))
    log.info("deleted key dir path=%s", target)
    return f"deleted {key_dir}\n"
