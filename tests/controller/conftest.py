"""Fixtures shared by the controller tests that speak to a real controller app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session (agents' links, raw requests)."""
    async with aiohttp.ClientSession() as session:
        yield session
