"""Helpers shared by the in-network (fslink, filesystem, swift) and legacy API tests.

Copy/upload/delete jobs are real built-in agent operations working on the real
storeBase of the harness; only plugin containers are simulated (fake runtime).
Where a test needs a job in a state no real operation can be held in (a copy that
is still ``started``, an ``undefined`` one), :func:`force_state` moves the job in
the controller's store, as pfcon's own mocked tests set the container state.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from agent.protocol import Mount
from controller.states import State
from controller.store import STORE
from tests.api.conformance_support import plugin_fields, read_json
from tests.conftest import Harness

INCOMING, OUTGOING = "/share/incoming", "/share/outgoing"
INNETWORK_INFO_KEYS = ["server_version", "pfcon_innetwork", "storage_env", "requires_copy_job",
                       "requires_upload_job", "container_env", "compute_volume_type"]
NO_COPY = ("No copy job found. A copy job must complete successfully before scheduling a "
           "plugin job.")
COPY_NOT_DONE = ("Copy job has not completed successfully (status: {}). Run the copy job "
                 "first.")
NO_PLUGIN = "No plugin job found. A plugin job must complete before scheduling an upload job."
PLUGIN_NOT_DONE = ("Plugin job has not completed yet (status: {}). The plugin job must finish "
                   "before uploading.")
SIBLING_ACTIVE = ("The {} job is still active (status: {}). All jobs must finish before "
                  "scheduling a delete job.")


def skipped(jid: str, message: str) -> dict[str, Any]:
    return {"compute": {"jid": jid, "image": "", "cmd": "", "status": "finishedSuccessfully",
                        "message": message, "timestamp": "", "logs": ""}}


async def post_form(s: aiohttp.ClientSession, h: Harness, path: str,
                    fields: Sequence[tuple[str, str]] | dict[str, str]) -> tuple[int, Any]:
    r = await s.post(h.base + path, data=fields)
    return r.status, await read_json(r)


async def post_copy(s: aiohttp.ClientSession, h: Harness, jid: str, input_dirs: Iterable[str],
                    output_dir: str | None, **extra: str) -> tuple[int, Any]:
    fields = [("jid", jid), *(("input_dirs", d) for d in input_dirs)]
    if output_dir is not None:
        fields.append(("output_dir", output_dir))
    fields.extend(extra.items())
    return await post_form(s, h, "copyjobs/", fields)


async def post_innetwork_plugin(s: aiohttp.ClientSession, h: Harness, jid: str, *,
                                env: Sequence[str] = (), drop: Iterable[str] = (),
                                **overrides: str | Sequence[str]) -> tuple[int, Any]:
    """A url-encoded plugin POST as python-pfconclient sends it in-network."""
    return await post_form(s, h, "pluginjobs/", plugin_fields(jid, env=env, drop=drop,
                                                              **overrides))


async def force_state(h: Harness, name: str, state: State, message: str) -> None:
    """Move the live job ``name`` to ``state`` in the controller's store."""
    store = h.app[STORE]
    job = await store.get_live(name)
    assert job is not None, name
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    values: dict[str, Any] = {"message": message, "started_at": now}
    if state not in (State.RUNNING, State.QUEUED, State.ASSIGNED):
        values["finished_at"] = now
    assert await store.apply_event(job.id, job.attempt, state, **values) is not None


async def job_spec_mounts(h: Harness, name: str) -> list[Mount]:
    """The mounts the controller recorded in the job's spec (what an agent receives)."""
    job = await h.app[STORE].get_live(name)
    assert job is not None, name
    return [Mount(**m) for m in job.spec["mounts"]]


def runtime_mounts(h: Harness, name: str) -> list[Mount]:
    """The mounts the fake runtime received for its workload ``name``."""
    assert h.runtime is not None
    return list(h.runtime._workloads[name].spec.mounts)


async def fleet_names(s: aiohttp.ClientSession, h: Harness) -> list[tuple[str, int, str]]:
    """(name, attempt, state) of every job the controller knows, removed ones too."""
    r = await s.get(h.base + "fleet/jobs/?all=1")
    assert r.status == 200
    return sorted((j["name"], j["attempt"], j["state"]) for j in (await read_json(r))["jobs"])


def all_files(root: Path) -> dict[str, str]:
    """Every regular file under root (relative posix path -> text)."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def read_params(h: Harness, jid: str, name: str) -> Any:
    return json.loads((h.config.storebase_mount / f"key-{jid}" / name).read_text())
