"""The roles and playbooks pass ansible-lint (production profile, .ansible-lint) and
ansible-playbook --syntax-check, and every role documents each of its variables the same
way in defaults/main.yml, meta/argument_specs.yml and its README."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.daemons import REPO_ROOT

BIN = Path(sys.executable).parent
ROLES = sorted(p.name for p in (REPO_ROOT / "roles").iterdir() if p.is_dir())
PLAYBOOKS = sorted(p.name for p in (REPO_ROOT / "playbooks").glob("*.yml"))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    return env | {"ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
                  "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
                  "NO_COLOR": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def test_the_expected_roles_and_playbooks_exist() -> None:
    assert {"storebase", "container_engine", "pfleet_controller", "pfleet_agent",
            "slurm_login"} <= set(ROLES)
    assert {"site.yml", "storage.yml", "controller.yml", "agents.yml", "health.yml",
            "upgrade.yml"} <= set(PLAYBOOKS)
    for role in ROLES:
        for part in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml",
                     "tasks/main.yml", "README.md"):
            assert (REPO_ROOT / "roles" / role / part).is_file(), (role, part)


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=REPO_ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert "0 failure(s), 0 warning(s)" in res.stdout + res.stderr


def _example_inventory(tmp_path: Path) -> Path:
    """inventory.example as an operator uses it: copied to inventory.yml."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text((REPO_ROOT / "inventory.example").read_text())
    return inventory


def test_example_inventory_has_every_group_and_the_required_settings(tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(_example_inventory(tmp_path)),
                          "--list"], cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=120)
    # Ansible's own warnings; a dependency's Python warning (cryptography 51 deprecates
    # the DSA that ansible-core imports) says nothing about the inventory
    assert res.returncode == 0 and "[WARNING]" not in res.stderr.upper(), res.stderr
    listing = json.loads(res.stdout)
    for group in ("pfleet_controller", "pfleet_storage_server", "pfleet_docker_hosts",
                  "pfleet_podman_hosts", "pfleet_slurm_login"):
        assert listing[group]["hosts"], group
    controller = listing["pfleet_controller"]["hosts"][0]
    settings = listing["_meta"]["hostvars"][controller]
    for name in ("pfleet_controller_secret_key", "pfleet_controller_pfcon_password"):
        assert "vault_" in settings[name], name  # secrets come from a vault


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook: str, tmp_path: Path) -> None:
    res = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i",
                          str(_example_inventory(tmp_path)), f"playbooks/{playbook}"],
                         cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Unable to parse" not in res.stderr, res.stderr


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_is_documented_alike(role: str) -> None:
    d = REPO_ROOT / "roles" / role
    defaults = yaml.safe_load((d / "defaults/main.yml").read_text())
    spec = yaml.safe_load((d / "meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert list(options) == list(defaults), "argument_specs and defaults differ"
    for name, value in defaults.items():
        assert name.startswith(role + "_"), f"{name}: not prefixed with the role's name"
        option = options[name]
        assert option.get("description"), name
        if isinstance(value, str) and "{{" in value:
            assert "default" not in option, name  # computed: documented, not declared
        else:
            assert option.get("default") == value, name
    readme = (d / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(" + role + r"_[a-z0-9_]+)` \| (.*?) \|", readme, re.M))
    assert list(rows) == list(defaults), "the README's variable tables and defaults differ"
    for name, value in defaults.items():
        shown = rows[name].replace("\\|", "|")
        if isinstance(value, str):
            assert shown == (f"`{value}`" if value else '`""`'), name
        elif isinstance(value, bool):
            assert shown == f"`{str(value).lower()}`", name
    mentioned = set(re.findall(r"`(" + role + r"_[a-z0-9_]+)`", readme))
    assert mentioned <= set(defaults), f"README names unknown variables {mentioned - set(defaults)}"
