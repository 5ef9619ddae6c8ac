"""Directory trees deeper than Python's recursion limit, as a plugin can write them
(built with ``mkdir``/``open`` relative to a directory descriptor)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.fstree import remove_tree

DEEPER_THAN_RECURSION = 1050  # Python's default limit is 1000 frames


def deep_tree(root: Path, levels: int, name: str = "d") -> str:
    """``levels`` nested dirs under root with a file at the bottom; its relative path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        leaf = os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
    finally:
        os.close(fd)
    return "/".join([name] * levels + ["f.txt"])


def remove_deep_trees(tmp_path: Path) -> None:
    """pytest removes old temporary dirs with shutil.rmtree, which a tree deeper than
    the recursion limit crashes (the whole session then fails): a test that made one
    removes its temporary dir's contents itself."""
    for entry in os.scandir(tmp_path):
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
