"""Trees deeper than Python's recursion limit, which a plugin (or a zip's entry names)
can make, are counted and removed by the controller without ``RecursionError``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.api.legacy import _remove_key_dir
from controller.storage.modes import count_input_files
from controller.storage.zipmode import STAGING_DIR, prepare_upload_dirs
from tests.support.trees import DEEPER_THAN_RECURSION, deep_tree, remove_deep_trees


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    yield
    remove_deep_trees(tmp_path)


def test_filesystem_nfiles_counts_a_very_deep_input_dir(tmp_path: Path) -> None:
    data = tmp_path / "storeBase" / "home" / "in"
    data.mkdir(parents=True)
    (data / "top.txt").write_text("x")
    deep_tree(data, DEEPER_THAN_RECURSION)
    assert count_input_files(tmp_path / "storeBase", "home/in") == 2


def test_a_stale_staging_dir_holding_a_very_deep_tree_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / "storeBase" / STAGING_DIR / "0123abcd"
    stale.mkdir(parents=True)
    deep_tree(stale, DEEPER_THAN_RECURSION)
    assert prepare_upload_dirs(tmp_path / "storeBase", tmp_path / "spool") == 1
    assert os.listdir(tmp_path / "storeBase" / STAGING_DIR) == []


def test_the_legacy_delete_removes_a_very_deep_key_dir(tmp_path: Path) -> None:
    key = tmp_path / "key-jid1"
    (key / "outgoing").mkdir(parents=True)
    deep_tree(key / "outgoing", DEEPER_THAN_RECURSION)
    _remove_key_dir(key)
    assert not key.exists()
