"""The client side of the Docker-over-TLS tests, run inside the engine's network
namespace (its TCP listener is on that namespace's loopback, out of pytest's reach).

    nsenter --net=/run/netns/NS python -m tests.support.docker_tls_client probe|job IMAGE

The runtime is configured as an operator would: the agent's settings from the
environment (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``, ...) through
``load_agent_config`` and the runtime registry.  One JSON object goes to stdout:
``probe`` reports the probe; ``job`` also runs a busybox job to its end (events,
status, logs, remove).  The loop runs in debug mode; callbacks that held it longer
than 0.5 s are listed in ``slow_callbacks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import uuid
from typing import Any

from agent.config import load_agent_config
from agent.protocol import JobSpec
from agent.runtimes import create_runtime
from agent.runtimes.docker import DockerRuntime
from tests.support.slow_callbacks import SlowCallbacks, debug_loop_settings

POLL = 0.1
WITHIN = 30.0  # seconds the job may take to exit, and its event to arrive
async def _job(runtime: DockerRuntime, image: str) -> dict[str, Any]:
    name = f"pfleet-tls-{uuid.uuid4().hex[:10]}"
    spec = JobSpec(job=f"job-{name}", attempt=1, name=name, jid=name, kind="plugin",
                   image=image, command=["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
    events: list[str] = []

    async def follow() -> None:
        async for job in runtime.changes():
            events.append(job)

    follower = asyncio.create_task(follow())
    for _ in range(int(WITHIN / POLL)):  # subscribed before the job starts
        if runtime.event_streams or follower.done():
            break
        await asyncio.sleep(POLL)
    try:
        handle = await runtime.start(spec)
        states: list[str] = []
        status = None
        for _ in range(int(WITHIN / POLL)):
            status = (await runtime.status([handle]))[spec.job]
            if not states or states[-1] != status.state:
                states.append(status.state)
            if status.state == "exited" and spec.job in events:
                break
            await asyncio.sleep(POLL)
        logs = await runtime.logs(handle, 100)
        listed = [h.name for h in await runtime.list_ours()]
        await runtime.remove(handle)
        after = (await runtime.status([handle]))[spec.job].state
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    return {
        "name": name,
        "states": states,
        "exit_code": status.exit_code if status else None,
        "job_events": events.count(spec.job),
        "logs": logs,
        "listed": name in listed,
        "after_remove": after,
    }


async def main(scenario: str, image: str) -> dict[str, Any]:
    slow = SlowCallbacks()
    logging.getLogger("asyncio").addHandler(slow)
    debug_loop_settings(asyncio.get_running_loop())
    runtime = create_runtime(load_agent_config())
    if not isinstance(runtime, DockerRuntime):
        raise SystemExit(f"CONTAINER_ENV made a {type(runtime).__name__}, not a DockerRuntime")
    try:
        probe = await runtime.probe()
        result: dict[str, Any] = {"probe": {"health": probe.health, "reason": probe.reason,
                                            "cpu_millicores": probe.cpu_millicores}}
        if scenario == "job" and probe.health == "healthy":
            result["job"] = await _job(runtime, image)
    finally:
        await runtime.close()
    result["slow_callbacks"] = slow.seen
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    scenario, image = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    print(json.dumps(asyncio.run(main(scenario, image))))
