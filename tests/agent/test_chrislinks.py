"""ChRIS link expansion in ``incoming/`` (agent.chrislinks, pfcon-api.md §3.6).

The zip layouts are what CUBE sends: every file under the input prefix, relative
to it, plus the files reached through each link at their full storage path.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from agent import chrislinks
from agent.chrislinks import LinkError, count_files, expand_links
from controller.storage.zipstream import unpack_zip


def stage(tmp_path: Path, files: dict[str, str]) -> Path:
    """Zip ``files`` like CUBE does and unpack it as the zipfile data step does."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    (tmp_path / "data.zip").write_bytes(buf.getvalue())
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    unpack_zip(tmp_path / "data.zip", incoming, max_files=1000, max_bytes=1 << 20)
    return incoming


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def test_case_a_link_outside_the_input_prefix(tmp_path: Path) -> None:
    incoming = stage(
        tmp_path,
        {
            "a.txt": "a",
            "sub/b.txt": "b",
            "home_user_uploads_x.chrislink": "home/user/uploads/x\n",
            "home/user/uploads/x/up.txt": "up",
        },
    )
    expand_links(incoming)
    assert files(incoming) == {"a.txt", "sub/b.txt", "home_user_uploads_x/up.txt"}
    assert (incoming / "home_user_uploads_x/up.txt").read_text() == "up"
    assert sorted(os.listdir(incoming)) == ["a.txt", "home_user_uploads_x", "sub"]
    assert count_files(incoming) == 3


def test_case_b_link_inside_the_input_prefix(tmp_path: Path) -> None:
    # input prefix home/user/cube: the link target home/user/cube/test is inside it,
    # so its file is already at test/test_file.txt and nothing is at the full path
    incoming = stage(
        tmp_path,
        {"test/test_file.txt": "hello", "test.chrislink": "home/user/cube/test"},
    )
    expand_links(incoming)
    assert files(incoming) == {"test/test_file.txt"}
    assert sorted(os.listdir(incoming)) == ["test"]


def test_case_c_nested_links(tmp_path: Path) -> None:
    incoming = stage(
        tmp_path,
        {
            "home_bob.chrislink": "home/bob",
            "home/bob/PIPELINES_bob.chrislink": "PIPELINES/bob",
            "PIPELINES/bob/pipeline.yml": "name: p",
        },
    )
    expand_links(incoming)
    assert files(incoming) == {"home_bob/PIPELINES_bob/pipeline.yml"}
    assert sorted(os.listdir(incoming)) == ["home_bob"]
    assert count_files(incoming) == 1


def test_link_to_a_file_uses_its_directory(tmp_path: Path) -> None:
    incoming = stage(
        tmp_path,
        {
            "l.chrislink": "home/bob/f.txt",
            "home/bob/f.txt": "f",
            "home/bob/g/h.txt": "h",
        },
    )
    expand_links(incoming)
    assert files(incoming) == {"home_bob/f.txt", "home_bob/g/h.txt"}


def test_loop_between_two_links_terminates(tmp_path: Path) -> None:
    incoming = stage(
        tmp_path,
        {
            "a.chrislink": "p/a",
            "p/a/fa.txt": "a",
            "p/a/b.chrislink": "p/b",
            "p/b/fb.txt": "b",
            "p/b/a.chrislink": "p/a",
        },
    )
    expand_links(incoming)
    assert files(incoming) == {"p_a/fa.txt", "p_a/p_b/fb.txt"}


def test_link_whose_target_contains_it_terminates(tmp_path: Path) -> None:
    incoming = stage(tmp_path, {"x/l.chrislink": "x", "x/f.txt": "f"})
    expand_links(incoming)
    # 'x' is itself a target, so the source folder stays
    assert files(incoming) == {"x/f.txt", "x/x/f.txt"}


@pytest.mark.parametrize("target", ["home/nobody/gone", "", "   \n"])
def test_missing_or_empty_target_removes_the_link(tmp_path: Path, target: str) -> None:
    incoming = stage(tmp_path, {"a.txt": "a", "l.chrislink": "home/nobody/gone", "d/": ""})
    if target.strip() != "home/nobody/gone":
        (incoming / "l.chrislink").write_text(target)
        with pytest.raises(LinkError) as exc:
            expand_links(incoming)
        assert str(exc.value) == "data_file: ChRIS link 'l.chrislink' is empty"
        return
    expand_links(incoming)
    assert files(incoming) == {"a.txt"}
    assert sorted(os.listdir(incoming)) == ["a.txt", "d"]


def test_link_to_an_empty_directory(tmp_path: Path) -> None:
    # pfcon#154: a link to an empty directory must not crash
    incoming = stage(tmp_path, {"l.chrislink": "home/bob/empty", "home/bob/empty/": ""})
    expand_links(incoming)
    assert files(incoming) == set()
    assert sorted(os.listdir(incoming)) == ["home_bob_empty"]


@pytest.mark.parametrize("target", ["../etc", "home/../../etc", "/etc/passwd", "..", "C:\\Windows"])
def test_escaping_targets_are_refused(tmp_path: Path, target: str) -> None:
    incoming = stage(tmp_path, {"sub/evil.chrislink": target})
    with pytest.raises(LinkError) as exc:
        expand_links(incoming)
    assert str(exc.value) == (
        f"data_file: ChRIS link 'sub/evil.chrislink' has a target outside the job's input:"
        f" {target!r}"
    )
    assert exc.value.status == 400


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "s.txt").write_text("secret")
    (outside / "evil.chrislink").write_text("home/bob")
    incoming = stage(
        tmp_path,
        {"l.chrislink": "home/evil/secret", "m.chrislink": "home/bob", "home/bob/ok.txt": "ok"},
    )
    (incoming / "home" / "evil").symlink_to(outside)
    (incoming / "sym.chrislink").symlink_to(outside / "evil.chrislink")
    (incoming / "symdir").symlink_to(outside)
    expand_links(incoming)
    assert files(incoming) == {"home_bob/ok.txt", "sym.chrislink"}
    assert (incoming / "sym.chrislink").is_symlink()
    assert (incoming / "symdir").is_symlink()
    assert (outside / "secret" / "s.txt").read_text() == "secret"
    assert (outside / "evil.chrislink").exists()
    assert count_files(incoming) == 1


def test_falls_back_to_copies_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: object, **kwargs: object) -> None:
        raise PermissionError("no hard links here")

    monkeypatch.setattr(chrislinks.os, "link", no_link)
    incoming = stage(tmp_path, {"l.chrislink": "home/bob", "home/bob/x/y.txt": "y"})
    expand_links(incoming)
    assert files(incoming) == {"home_bob/x/y.txt"}
    assert (incoming / "home_bob/x/y.txt").read_text() == "y"


def test_uses_hard_links_when_possible(tmp_path: Path) -> None:
    # 'home' is itself a target, so its source survives and shares inodes with the copy
    incoming = stage(
        tmp_path,
        {"l.chrislink": "home/bob", "home.chrislink": "home", "home/bob/y.txt": "y"},
    )
    expand_links(incoming)
    assert files(incoming) == {"home/bob/y.txt", "home_bob/y.txt"}
    assert os.path.samefile(incoming / "home/bob/y.txt", incoming / "home_bob/y.txt")


def test_expansion_blow_up_is_capped(tmp_path: Path) -> None:
    # each level links twice to the next: 2**12 copies from a 40-entry zip
    layout = {"top.chrislink": "lv/0"}
    for i in range(12):
        layout[f"lv/{i}/a/n.chrislink"] = f"lv/{i + 1}"
        layout[f"lv/{i}/b/n.chrislink"] = f"lv/{i + 1}"
    layout["lv/12/leaf.txt"] = "leaf"
    incoming = stage(tmp_path, layout)
    with pytest.raises(LinkError) as exc:
        expand_links(incoming, max_entries=500)
    assert str(exc.value) == "data_file: ChRIS links expand to more than 500 files"
    assert exc.value.status == 413


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    n = chrislinks.MAX_LINK_DEPTH + 2
    layout = {"start.chrislink": "c/0"}
    layout.update({f"c/{i}/n.chrislink": f"c/{i + 1}" for i in range(n)})
    incoming = stage(tmp_path, layout)
    with pytest.raises(LinkError, match="nested more than 64 levels deep"):
        expand_links(incoming)


def test_nesting_within_the_depth_limit_works(tmp_path: Path) -> None:
    layout = {"start.chrislink": "c/0", "c/5/leaf.txt": "leaf"}
    layout.update({f"c/{i}/n.chrislink": f"c/{i + 1}" for i in range(5)})
    incoming = stage(tmp_path, layout)
    expand_links(incoming)
    assert files(incoming) == {"c_0/c_1/c_2/c_3/c_4/c_5/leaf.txt"}


def test_count_files_excludes_links_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "x.chrislink").write_text("home/x")
    (tmp_path / "s").symlink_to(tmp_path / "a.txt")
    assert count_files(tmp_path) == 2
