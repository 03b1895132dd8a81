"""zip_directory: reproducible bytes, skipped folders, links, and bundles the server accepts."""

from __future__ import annotations

import hashlib
import os
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from peergpu.bundles import safe_extract, validate_bundle
from peergpu.client import BundleError, zip_directory


def make_tree(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "model.py").write_text("print('hi')\n")
    (root / "train.sh").write_text("#!/bin/sh\necho train\n")
    (root / "train.sh").chmod(0o755)
    (root / "data.bin").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir()
    for skipped in (".git", "__pycache__", ".venv", "node_modules", "src/pkg/__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "junk").write_text("x")
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_tree_gives_the_same_bytes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    first = zip_directory(tree, tmp_path / "a.zip")
    os.utime(tree / "train.sh", (1, 1))  # timestamps and creation order do not matter
    (tree / "src" / "pkg" / "model.py").touch()
    second = zip_directory(tree, tmp_path / "b.zip")
    assert digest(first) == digest(second)

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in sorted(["data.bin", "train.sh"], reverse=True):  # another creation order
        (copy / name).write_bytes((tree / name).read_bytes())
    (copy / "train.sh").chmod(0o755)
    (copy / "empty").mkdir()
    (copy / "src" / "pkg").mkdir(parents=True)
    (copy / "src" / "pkg" / "model.py").write_text("print('hi')\n")
    assert digest(zip_directory(copy, tmp_path / "c.zip")) == digest(first)


def test_members_are_sorted_and_junk_folders_skipped(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = zip_directory(tree, tmp_path / "bundle.zip")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
        stamps = {i.date_time for i in zf.infolist()}
    assert names == ["data.bin", "empty/", "src/pkg/model.py", "train.sh"]
    assert modes["train.sh"] == 0o755 and modes["data.bin"] == 0o644
    assert stamps == {(1980, 1, 1, 0, 0, 0)}


def test_the_bundle_passes_the_servers_checks_and_extracts(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = zip_directory(tree, tmp_path / "bundle.zip")
    summary = validate_bundle(archive)
    assert summary.members == 4
    out = tmp_path / "out"
    safe_extract(archive, out)
    assert (out / "data.bin").read_bytes() == (tree / "data.bin").read_bytes()
    assert os.access(out / "train.sh", os.X_OK)


def test_progress_counts_every_byte(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    calls: list[tuple[int, int]] = []
    zip_directory(tree, tmp_path / "bundle.zip", progress=lambda d, t: calls.append((d, t)))
    total = sum(p.stat().st_size for p in [tree / "data.bin", tree / "train.sh"]) + len(
        "print('hi')\n"
    )
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_links_inside_the_tree_are_stored_as_their_contents(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "alias.py").symlink_to("src/pkg/model.py")
    (tree / "lib").symlink_to("src", target_is_directory=True)
    archive = zip_directory(tree, tmp_path / "bundle.zip")
    with zipfile.ZipFile(archive) as zf:
        assert zf.read("alias.py") == b"print('hi')\n"
        assert zf.read("lib/pkg/model.py") == b"print('hi')\n"
    validate_bundle(archive)  # no link entries reach the zip


@pytest.mark.parametrize(
    "make_link",
    [
        lambda tree, outside: (tree / "secret").symlink_to(outside / "passwd"),
        lambda tree, outside: (tree / "src" / "up").symlink_to(outside, target_is_directory=True),
        lambda tree, outside: (tree / "abs").symlink_to("/etc/hostname"),
    ],
    ids=["file-outside", "dir-outside", "absolute"],
)
def test_links_out_of_the_tree_are_refused(
    tmp_path: Path, make_link: Callable[[Path, Path], None]
) -> None:
    tree = make_tree(tmp_path / "tree")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("secret")
    make_link(tree, outside)
    dest = tmp_path / "bundle.zip"
    with pytest.raises(BundleError, match="outside the folder"):
        zip_directory(tree, dest)
    assert not dest.exists()


def test_loops_dangling_links_and_sockets_are_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "src" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(BundleError, match="loop"):
        zip_directory(tree, tmp_path / "a.zip")
    (tree / "src" / "loop").unlink()
    (tree / "dangling").symlink_to("nowhere")
    with pytest.raises(BundleError, match="link to nothing"):
        zip_directory(tree, tmp_path / "b.zip")
    (tree / "dangling").unlink()
    short = Path("/tmp") / f"pg-sock-{os.getpid()}"  # AF_UNIX paths must be short
    short.mkdir(exist_ok=True)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short / "s"))
            with pytest.raises(BundleError, match="not a regular file"):
                zip_directory(short, tmp_path / "c.zip")
    finally:
        (short / "s").unlink(missing_ok=True)
        short.rmdir()


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        zip_directory(tmp_path / "missing", tmp_path / "a.zip")


def test_the_zip_inside_the_tree_is_not_bundled_into_itself(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = zip_directory(tree, tree / "bundle.zip")
    with zipfile.ZipFile(archive) as zf:
        assert "bundle.zip" not in zf.namelist()
