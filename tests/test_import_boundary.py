"""The agent must stay light: no agent module may import the controller."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import agent


def agent_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))


def test_no_agent_module_loads_the_controller() -> None:
    modules = agent_modules()
    assert "agent.runtimes.docker" in modules and "agent.main" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'controller' or "
            "m.startswith('controller.'))\n"
            "print(','.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_controller_imports_only_the_protocol_and_chrislinks_from_agent() -> None:
    # outside controller.local_agent, which embeds a whole agent
    code = ("import sys, controller.app, controller.cli\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('agent'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "agent,agent.chrislinks,agent.fstree,agent.protocol"
