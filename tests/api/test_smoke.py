from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import Harness
from tests.support.zips import make_zip


async def test_plugin_flow_on_fake_agent(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        form = aiohttp.FormData()
        for k, v in {"jid": "j1", "entrypoint": "true", "auid": "a", "number_of_workers": "1",
                     "cpu_limit": "1000", "memory_limit": "200", "gpu_limit": "0",
                     "image": "x", "type": "ds"}.items():
            form.add_field(k, v)
        form.add_field("data_file", make_zip({"a.txt": b"hi"}), filename="data_file")
        r = await s.post(harness.base + "pluginjobs/", data=form)
        body = await r.json()
        print(body)
        assert r.status == 201
        for _ in range(100):
            r = await s.get(harness.base + "pluginjobs/j1/")
            body = await r.json()
            if body["compute"]["status"] == "finishedSuccessfully":
                break
            await asyncio.sleep(0.05)
        print(body)
        assert body["compute"]["status"] == "finishedSuccessfully"
