"""A KubernetesRuntime pointed at this test's kmock server through a kubeconfig."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import JobSpec
from agent.runtimes.kubernetes import KubernetesRuntime, KubernetesSettings
from controller.storage import zipmode
from tests.support.kmock_server import KmockServer, Kubelet

NAMESPACE = "chris"
TOKEN = "kmock-test-token"


def job_spec(jid: str | None = None, *, attempt: int = 1, **fields: Any) -> JobSpec:
    jid = jid or f"jid-{uuid.uuid4().hex[:8]}"
    return JobSpec(job=fields.pop("job", f"job{uuid.uuid5(uuid.NAMESPACE_URL, jid).hex}"),
                   attempt=attempt, name=fields.pop("name", jid), jid=jid, kind="plugin",
                   image=fields.pop("image", "fnndsc/pl-simpledsapp:2.1"),
                   command=fields.pop("command", ["simpledsapp", "/share/outgoing"]),
                   mounts=zipmode.plugin_mounts(jid), **fields)


MakeRuntime = Callable[..., KubernetesRuntime]


@pytest.fixture
async def make_runtime(kmock_server: KmockServer,
                       tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    kubeconfig = kmock_server.write_kubeconfig(tmp_path / "kubeconfig", token=TOKEN)
    made: list[KubernetesRuntime] = []

    def make(**overrides: Any) -> KubernetesRuntime:
        settings = KubernetesSettings(volume_name="storebase-pvc", namespace=NAMESPACE,
                                      agent_name="k1", kubeconfig=str(kubeconfig))
        runtime = KubernetesRuntime(dataclasses.replace(settings, **overrides))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.close()


@pytest.fixture
def runtime(make_runtime: MakeRuntime) -> KubernetesRuntime:
    return make_runtime()


@pytest.fixture
def kubelet(kmock_server: KmockServer) -> Iterator[Kubelet]:
    k = Kubelet(kmock_server, NAMESPACE)
    yield k
    k.close()
