"""Fuzzing dataset reading (folder, .zip, .tar, .tar.gz) with mutated archives, member names that
try to leave the folder, and images whose headers claim absurd sizes. Property: the dataset is read
into RGB images with captions, or refused with DatasetError naming it; nothing is written anywhere."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib

import pytest
from fuzz_support import PATH_TRICKS, Seeds, bounded, expect_only, fuzz_settings, mutated_bytes, tree_snapshot
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from lora_ops import dataset as ds


def png_bytes(size=(16, 8), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG whose header (with a correct CRC) claims width x height, followed by `payload` as image data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


MEMBERS = {"a.png": png_bytes(), "a.txt": b"a red band", "sub/b.png": png_bytes(color=(0, 0, 255)), "sub/b.txt": b"blue",
           # edit pairs: a mutant that loses or damages one half must be refused
           "control/a.png": png_bytes(color=(0, 200, 0)), "sub/control/b.png": png_bytes(color=(9, 9, 9))}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_boundaries(data: bytes) -> tuple[int, ...]:
    points = {0, len(data)}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            # local header fields: sizes at +18/+22, name length at +26; the data after the name
            start = info.header_offset
            points.update((start, start + 14, start + 18, start + 22, start + 26, start + 30 + len(info.filename)))
    end_record = data.rfind(b"PK\x05\x06")
    central = struct.unpack_from("<I", data, end_record + 16)[0]
    points.update((central, end_record, end_record + 10, end_record + 12, end_record + 16))
    return tuple(sorted(points))


def tar_boundaries(data: bytes) -> tuple[int, ...]:
    # 512-byte blocks; inside a header: name 0, size 124, checksum 148, type flag 156
    return tuple(sorted({b + f for b in range(0, len(data), 512) for f in (0, 124, 148, 156)} | {len(data)}))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset_fuzz")
    zipped, tarred = zip_bytes(MEMBERS), tar_bytes(MEMBERS)
    return Seeds(folder=folder, zip=(zipped, zip_boundaries(zipped)), tar=(tarred, tar_boundaries(tarred)),
                 tgz=(tar_bytes(MEMBERS, "w:gz"), (0, 10)))


def check_read(root, name: str, data: bytes | None = None, size: int | None = None) -> None:
    """Read `root/name` (writing `data` there first) and check the property."""
    path = os.path.join(root, name)
    if data is not None:
        with open(path, "wb") as file:
            file.write(data)
    before, cwd_before = tree_snapshot(root), set(os.listdir(os.getcwd()))
    outcome = bounded(ds.read_dataset, size or max(len(data or b""), 1), path)
    expect_only(outcome, ds.DatasetError, name)
    assert tree_snapshot(root) == before and set(os.listdir(os.getcwd())) == cwd_before, "reading wrote files"
    if outcome.error is None:
        for sample in outcome.result:
            assert sample.image.mode == "RGB" and sample.image.width * sample.image.height <= ds.MAX_IMAGE_PIXELS
            assert sample.caption is None or isinstance(sample.caption, str)
            assert ds.control_target(sample.name) is None, "a control image was read as a target"
        # edit pairs: every sample has its control, or none has
        assert len({sample.control is None for sample in outcome.result}) == 1
        for sample in outcome.result:
            if sample.control is not None:
                assert sample.control.mode == "RGB"
                assert os.path.splitext(ds.control_target(sample.control_name))[0] == os.path.splitext(sample.name)[0]


@fuzz_settings(ci_examples=200)
@given(data=st.data(), kind=st.sampled_from(("zip", "tar", "tgz")))
def test_mutated_archives_are_read_or_refused(seeds, data, kind):
    valid, points = seeds[kind]
    extension = {"zip": ".zip", "tar": ".tar", "tgz": ".tar.gz"}[kind]
    check_read(str(seeds["folder"]), "mutant" + extension, data.draw(mutated_bytes(valid, points)))


member_names = st.sampled_from(PATH_TRICKS) | st.builds(
    lambda prefix, stem, ext: prefix + stem + ext,
    st.sampled_from(("", "../", "/", "\\", "..\\", "a/../../", "C:", "./", "sub/", "\u2025/")),
    st.text(min_size=0, max_size=12),
    st.sampled_from((".png", ".txt", ".PNG", ".jpg", ".json", "")),
)


@fuzz_settings(ci_examples=200)
@given(names=st.lists(member_names, min_size=1, max_size=5), kind=st.sampled_from(("zip", "tar")),
       contents=st.lists(st.sampled_from((png_bytes(), b"caption", b"\xff\xfe bad", png_claiming(9000, 9000),
                                          png_claiming(1 << 31, 1), b"")), min_size=5, max_size=5))
def test_member_names_that_try_to_leave_the_folder(seeds, names, kind, contents):
    members = dict(zip(names, contents))
    try:
        data = zip_bytes(members) if kind == "zip" else tar_bytes(members)
    except (ValueError, UnicodeEncodeError, IndexError):
        return  # names the archive writers themselves refuse
    check_read(str(seeds["folder"]), f"names.{kind}", data)


@fuzz_settings(ci_examples=100)
@given(width=st.sampled_from((0, 1, 16, 4096, 8000, 8001, 65535, 1 << 20, (1 << 31) - 1, (1 << 32) - 1)),
       height=st.sampled_from((0, 1, 16, 4096, 8000, 8001, 65535, 1 << 20, (1 << 31) - 1, (1 << 32) - 1)),
       payload=st.binary(max_size=64) | st.just(b"\x00" * 4096))
def test_images_claiming_any_size_are_decoded_or_refused_quickly(seeds, width, height, payload):
    folder = seeds["folder"] / "claims"
    folder.mkdir(exist_ok=True)
    (folder / "x.png").write_bytes(png_claiming(width, height, payload))
    check_read(str(seeds["folder"]), "claims", size=len(payload) + 64)


@fuzz_settings(ci_examples=60)
@given(files=st.dictionaries(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
    .filter(lambda n: n not in (".", "..")),
    st.sampled_from((png_bytes(), b"caption", b"\xff bad", png_claiming(3, 3))), max_size=5))
def test_folders_with_any_file_names(seeds, files):
    folder = seeds["folder"] / "folder"
    for old in folder.glob("*") if folder.exists() else ():
        old.unlink()
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        try:
            (folder / name).write_bytes(data)
        except OSError:
            return  # a name this file system refuses (too long in bytes)
    check_read(str(seeds["folder"]), "folder", size=sum(map(len, files.values())) + 1)


pair_names = st.builds(lambda folder, stem, ext: folder + stem + ext,
                       st.sampled_from(("", "x/", "control/", "x/control/", "control/x/", "Control/", "control/control/")),
                       st.sampled_from(("a", "b", "c")), st.sampled_from((".png", ".jpg")))


@fuzz_settings(ci_examples=200)
@given(names=st.lists(pair_names, unique=True, max_size=8))
def test_edit_pairs_are_joined_one_to_one_or_refused(names):
    """Any mix of targets and control folders: each target gets the one control of its stem and
    each control a target, or DatasetError names the dataset (no other error, no silent drop)."""
    names = sorted(names)
    try:
        pairs = ds.pair_controls("set", names)
    except ds.DatasetError as e:
        assert "'set'" in str(e)
        return
    controls = [n for n in names if ds.control_target(n) is not None]
    targets = [n for n in names if ds.control_target(n) is None]
    if not controls:
        assert pairs == {}
        return
    assert sorted(pairs) == targets and set(pairs.values()) == set(controls)
    for target, control in pairs.items():
        assert os.path.splitext(ds.control_target(control))[0] == os.path.splitext(target)[0]


# --- regressions the fuzzer found ------------------------------------------------------------


def test_corrupt_deflate_stream_is_refused(seeds):
    """Found by the fuzzer: zlib.error escaped from a zip member with damaged compressed data."""
    valid = bytearray(seeds["zip"][0])
    start = 30 + len("a.png")  # the first member's data, after its local header and name
    valid[start + 20:start + 24] = b"\xff\xff\xff\xff"
    path = seeds["folder"] / "deflate.zip"
    path.write_bytes(bytes(valid))
    with pytest.raises(ds.DatasetError, match="deflate.zip"):
        ds.read_dataset(str(path))


def test_member_declaring_more_than_the_archive_holds_allocates_nothing_for_it(seeds):
    """Found by the fuzzer: read(size) allocated a truncated tar member's declared size up front."""
    tarred = bytearray(tar_bytes({"a.png": png_bytes()}))
    tarred[124:136] = b"%011o\x00" % (1 << 30)  # 1 GiB declared in a 10 KB archive
    tarred[148:156] = b" " * 8
    tarred[148:155] = b"%06o\x00" % sum(tarred[:512])
    path = seeds["folder"] / "declares-1g.tar"
    path.write_bytes(bytes(tarred))
    outcome = bounded(ds.read_dataset, len(tarred), str(path))
    expect_only(outcome, ds.DatasetError, "declares-1g.tar")
    assert outcome.error is not None and outcome.peak_bytes < 8 << 20


def test_zip_member_with_an_empty_name_is_refused(seeds):
    """Found by the fuzzer: zipfile's is_dir() raised IndexError on an empty member name."""
    zipped = zip_bytes({"x": png_bytes()})
    path = seeds["folder"] / "empty-name.zip"
    # the name length fields (local header and central directory) set to 0, the name bytes dropped
    local, central = bytearray(zipped[:zipped.index(b"PK\x01\x02")]), bytearray(zipped[zipped.index(b"PK\x01\x02"):])
    local[26:28], central[28:30] = b"\x00\x00", b"\x00\x00"
    del local[30:31], central[46:47]
    end = central.index(b"PK\x05\x06")
    central[end + 12:end + 20] = struct.pack("<II", end, len(local))
    path.write_bytes(bytes(local + central))
    with pytest.raises(ds.DatasetError, match="empty name"):
        ds.read_dataset(str(path))


def test_zip_member_name_flagged_utf8_that_is_not_is_refused(seeds):
    """Found by `make fuzz` (20,000 examples): a local header with the UTF-8 name flag and a name
    that is not UTF-8 made zipfile raise UnicodeDecodeError when the member was opened."""
    zipped = bytearray(zip_bytes({"x.png": png_bytes()}))
    zipped[6:8] = struct.pack("<H", struct.unpack("<H", zipped[6:8])[0] | 0x800)  # local header: UTF-8 name
    zipped[30] = 0xFF  # first byte of the local header's name: never valid UTF-8
    path = seeds["folder"] / "bad-utf8-name.zip"
    path.write_bytes(bytes(zipped))
    with pytest.raises(ds.DatasetError, match="bad-utf8-name.zip"):
        ds.read_dataset(str(path))
