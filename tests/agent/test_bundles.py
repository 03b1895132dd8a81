"""Bundle validation and safe extraction, against real (and crafted) zip files."""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from peergpu.bundles import BundleError, BundleLimits, BundleSummary, safe_extract, validate_bundle

MiB = 1024**2


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.create_system = 3  # Unix
    return info


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def assert_nothing_written(outer: Path, dest: Path) -> None:
    """Nothing but (possibly) the empty destination exists around it."""
    assert tree(outer) <= {"dest"}
    assert not dest.exists() or tree(dest) == set()


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(the directory a bundle is extracted into, the directory around it)."""
    outer = tmp_path / "outer"
    outer.mkdir()
    return outer / "dest", outer


def test_good_bundle_extracts_with_safe_modes(tmp_path: Path, layout: tuple[Path, Path]) -> None:
    dest, _ = layout
    bundle = make_zip(
        tmp_path / "good.zip",
        [
            ("train.py", b"print('hi')\n"),
            (entry("run.sh", stat.S_IFREG | 0o755), b"#!/bin/sh\necho run\n"),
            (entry("setuid", stat.S_IFREG | 0o4777), b"x"),
            (entry("data/", stat.S_IFDIR | 0o700), b""),
            ("data/nested/values.csv", b"a,b\n1,2\n"),
            ("./data/./dot.txt", b"dot"),
        ],
    )
    expected = BundleSummary(members=6, total_bytes=12 + 19 + 1 + 8 + 3)
    assert validate_bundle(bundle) == expected
    assert not dest.exists()  # validation alone writes nothing
    assert safe_extract(bundle, dest) == expected
    assert (dest / "train.py").read_text() == "print('hi')\n"
    assert (dest / "data/nested/values.csv").read_bytes() == b"a,b\n1,2\n"
    assert (dest / "data/dot.txt").read_bytes() == b"dot"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o744
    assert stat.S_IMODE((dest / "train.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "setuid").stat().st_mode) == 0o744  # no setuid, no group/other
    assert stat.S_IMODE((dest / "data").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil", "path_traversal"),
        ("data/../../evil", "path_traversal"),
        ("..\\evil", "path_traversal"),
        ("/abs/evil", "absolute_path"),
        ("C:\\evil", "absolute_path"),
        ("C:evil", "absolute_path"),
        ("\\\\server\\share\\evil", "absolute_path"),
        ("dir\\evil", "invalid_name"),
        ("bad\x01name", "invalid_name"),
        ("./", "invalid_name"),
    ],
)
def test_bad_paths_are_refused(
    name: str, reason: str, tmp_path: Path, layout: tuple[Path, Path]
) -> None:
    dest, outer = layout
    bundle = make_zip(tmp_path / "bad.zip", [("fine.txt", b"ok"), (name, b"evil")])
    with pytest.raises(BundleError) as refused:
        validate_bundle(bundle)
    assert refused.value.reason == reason
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest)
    assert refused.value.reason == reason
    assert_nothing_written(outer, dest)
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (stat.S_IFLNK | 0o777, "symlink"),
        (stat.S_IFIFO | 0o644, "special_file"),
        (stat.S_IFCHR | 0o644, "special_file"),
        (stat.S_IFSOCK | 0o644, "special_file"),
    ],
)
def test_links_and_special_files_are_refused(
    mode: int, reason: str, tmp_path: Path, layout: tuple[Path, Path]
) -> None:
    dest, outer = layout
    bundle = make_zip(tmp_path / "link.zip", [(entry("link", mode), b"/etc/passwd")])
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest)
    assert refused.value.reason == reason
    assert_nothing_written(outer, dest)


def test_duplicates_are_refused(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate
        twice = make_zip(tmp_path / "twice.zip", [("a.txt", b"1"), ("a.txt", b"2")])
    below_file = make_zip(tmp_path / "below.zip", [("a", b"file"), ("a/b", b"below a file")])
    file_over_dir = make_zip(tmp_path / "over.zip", [("a/b", b"x"), ("a", b"file")])
    normalized = make_zip(tmp_path / "norm.zip", [("a/b", b"1"), ("a//./b", b"2")])
    for bundle in (twice, below_file, file_over_dir, normalized):
        with pytest.raises(BundleError) as refused:
            validate_bundle(bundle)
        assert refused.value.reason == "duplicate_name", bundle.name


def test_too_many_members(tmp_path: Path) -> None:
    bundle = make_zip(tmp_path / "many.zip", [(f"f{i}", b"") for i in range(10_001)])
    with pytest.raises(BundleError) as refused:
        validate_bundle(bundle)
    assert refused.value.reason == "too_many_members"
    assert validate_bundle(bundle, BundleLimits(max_members=10_001)).members == 10_001


def test_zip_bomb_is_refused_by_ratio(tmp_path: Path, layout: tuple[Path, Path]) -> None:
    dest, _ = layout
    bundle = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as member:
            zeros = bytes(MiB)
            for _ in range(50):
                member.write(zeros)
    assert bundle.stat().st_size < MiB
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest)
    assert refused.value.reason == "compression_ratio"
    assert not dest.exists()
    lenient_ratio = BundleLimits(max_total_bytes=10 * MiB, max_compression_ratio=1e9)
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest, lenient_ratio)
    assert refused.value.reason == "too_large"
    assert not dest.exists()


def test_size_limits(tmp_path: Path) -> None:
    random_data = os.urandom(2 * MiB)  # incompressible: no ratio problem
    bundle = make_zip(tmp_path / "big.zip", [("a.bin", random_data), ("b.bin", b"small")])
    with pytest.raises(BundleError) as refused:
        validate_bundle(bundle, BundleLimits(max_total_bytes=MiB))
    assert refused.value.reason == "too_large"
    with pytest.raises(BundleError) as refused:
        validate_bundle(bundle, BundleLimits(max_member_bytes=MiB))
    assert refused.value.reason == "too_large"
    assert validate_bundle(bundle, BundleLimits(max_member_bytes=3 * MiB)).members == 2


def test_small_compressible_files_pass_the_ratio_check(tmp_path: Path) -> None:
    bundle = make_zip(tmp_path / "text.zip", [(f"zeros{i}.txt", bytes(100_000)) for i in range(5)])
    assert validate_bundle(bundle).total_bytes == 500_000


def test_member_lying_about_its_size_is_refused(tmp_path: Path, layout: tuple[Path, Path]) -> None:
    dest, outer = layout
    bundle = make_zip(tmp_path / "liar.zip", [("data.bin", os.urandom(MiB))])
    _patch_member_header(bundle, file_size=1000)  # declares 1000 bytes, inflates to 1 MiB
    assert validate_bundle(bundle).total_bytes == 1000
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest)
    assert refused.value.reason == "corrupt"
    assert_nothing_written(outer, dest)  # the partial file was removed


def test_encrypted_members_are_refused(tmp_path: Path) -> None:
    bundle = make_zip(tmp_path / "secret.zip", [("secret.txt", b"data")])
    _patch_member_header(bundle, flag_bits=0x1)
    with pytest.raises(BundleError) as refused:
        validate_bundle(bundle)
    assert refused.value.reason == "encrypted"


def test_not_a_zip(tmp_path: Path) -> None:
    text = tmp_path / "text.zip"
    text.write_text("definitely not a zip")
    for bundle in (text, tmp_path / "missing.zip"):
        with pytest.raises(BundleError) as refused:
            validate_bundle(bundle)
        assert refused.value.reason == "not_a_zip"


def test_symlink_already_in_destination_is_not_followed(
    tmp_path: Path, layout: tuple[Path, Path]
) -> None:
    dest, outer = layout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest.mkdir()
    (dest / "link").symlink_to(elsewhere)
    bundle = make_zip(tmp_path / "through.zip", [("link/planted.txt", b"x")])
    with pytest.raises(BundleError) as refused:
        safe_extract(bundle, dest)
    assert refused.value.reason == "path_traversal"
    assert list(elsewhere.iterdir()) == []


def _patch_member_header(bundle: Path, *, file_size: int | None = None, flag_bits: int = 0) -> None:
    """Rewrite the (only) member's uncompressed size and/or flags in both of its headers."""
    data = bytearray(bundle.read_bytes())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    assert local >= 0 and central > local
    for offset, flags_at, size_at in ((local, 6, 22), (central, 8, 24)):
        if flag_bits:
            (flags,) = struct.unpack_from("<H", data, offset + flags_at)
            struct.pack_into("<H", data, offset + flags_at, flags | flag_bits)
        if file_size is not None:
            struct.pack_into("<I", data, offset + size_at, file_size)
    bundle.write_bytes(bytes(data))
