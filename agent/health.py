"""What a node has and how it is doing: psutil metrics for heartbeats, and the
agent's local ``GET /health`` endpoint (200 when healthy, 503 with the reasons).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

log = logging.getLogger("pfleet.agent.health")

MIB = 1 << 20


@dataclass
class NodeMetrics:
    cpu_percent: float
    memory_total_mib: int
    memory_available_mib: int
    disk_total_mib: int
    disk_free_mib: int
    storebase_ok: bool
    problems: list[str] = field(default_factory=list)


def collect_metrics(storebase: Path, min_free_mib: int) -> NodeMetrics:
    """Blocking but quick (psutil and one statvfs); call from an executor."""
    memory = psutil.virtual_memory()
    problems: list[str] = []
    try:
        disk = shutil.disk_usage(storebase)
        total, free = disk.total // MIB, disk.free // MIB
        ok = storebase.is_dir()
    except OSError as exc:
        total = free = 0
        ok = False
        problems.append(f"storeBase {storebase} missing: {exc.strerror or exc}")
    if ok and free < min_free_mib:
        problems.append(f"storeBase {storebase} nearly full: {free} MiB free "
                        f"(minimum {min_free_mib} MiB)")
    return NodeMetrics(cpu_percent=psutil.cpu_percent(interval=None),
                       memory_total_mib=memory.total // MIB,
                       memory_available_mib=memory.available // MIB,
                       disk_total_mib=total, disk_free_mib=free, storebase_ok=ok,
                       problems=problems)


def health_app(report: Callable[[], dict[str, Any]]) -> web.Application:
    """A tiny app serving ``report()`` at /health; 503 when it lists problems."""
    async def health(_request: web.Request) -> web.Response:
        body = report()
        return web.json_response(body, status=503 if body.get("problems") else 200)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/health/", health)
    return app
