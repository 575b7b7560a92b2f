import io
import logging
import os
import tarfile
import zipfile

import pytest
from PIL import Image

from lora_ops import dataset as ds


def png_bytes(size=(24, 16), color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def test_folder_pairs_images_with_captions_sorted(tmp_path, caplog):
    root = write_folder(tmp_path / "set", {
        "b.png": png_bytes(color=(0, 255, 0)), "b.txt": "a green square\n".encode(),
        "a.jpg": png_bytes(), "a.txt": "\ufeffred".encode(),
        "sub/c.webp": png_bytes(), "notes.json": b"{}", ".DS_Store": b"x",
    })
    with caplog.at_level(logging.WARNING):
        samples = ds.read_dataset(root)
    assert [s.name for s in samples] == ["a.jpg", "b.png", "sub/c.webp"]
    assert [s.caption for s in samples] == ["red", "a green square", None]
    assert samples[1].image.mode == "RGB" and samples[1].image.getpixel((0, 0)) == (0, 255, 0)
    assert "no caption" in caplog.text and "sub/c.webp" in caplog.text


def test_zip_and_tar_read_like_a_folder(tmp_path):
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("imgs/x.png", png_bytes())
        z.writestr("imgs/x.txt", "cap x")
    tpath = tmp_path / "set.tar.gz"
    with tarfile.open(tpath, "w:gz") as t:
        for name, data in {"x.png": png_bytes(), "x.txt": b"cap x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    zs, ts = ds.read_dataset(str(zpath)), ds.read_dataset(str(tpath))
    assert [(s.name, s.caption) for s in zs] == [("imgs/x.png", "cap x")]
    assert [(s.name, s.caption) for s in ts] == [("x.png", "cap x")]


@pytest.mark.parametrize("evil", ["../escape.png", "/abs.png", "a/../../up.png", "C:/win.png"])
def test_zip_slip_is_refused(tmp_path, evil):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("ok.png", png_bytes())
        z.writestr(evil, png_bytes())
    with pytest.raises(ds.DatasetError, match="outside"):
        ds.read_dataset(str(zpath))


def test_tar_links_are_refused(tmp_path):
    tpath = tmp_path / "links.tar"
    with tarfile.open(tpath, "w") as t:
        info = tarfile.TarInfo("x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(ds.DatasetError, match="link"):
        ds.read_dataset(str(tpath))


def test_zip_symlink_member_is_refused(tmp_path):
    zpath = tmp_path / "link.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        info = zipfile.ZipInfo("x.png")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ds.DatasetError, match="symbolic link"):
        ds.read_dataset(str(zpath))


def test_folder_symlink_is_refused(tmp_path):
    root = tmp_path / "set"
    write_folder(root, {"a.png": png_bytes()})
    os.symlink(tmp_path / "elsewhere.png", root / "b.png")
    with pytest.raises(ds.DatasetError, match="'b.png' is a symbolic link"):
        ds.read_dataset(str(root))


def test_decompression_bomb_is_refused_before_reading(tmp_path):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", png_bytes())
        z.writestr("big.txt", b"\0" * (3 << 20))  # 3 MiB that deflates to a few KiB
    assert zpath.stat().st_size < 64 << 10
    with pytest.raises(ds.DatasetError, match="over the 2 MiB budget"):
        ds.read_dataset(str(zpath), max_bytes=2 << 20)
    assert len(ds.read_dataset(str(zpath), max_bytes=4 << 20)) == 1


def test_member_larger_than_declared_is_refused(tmp_path):
    zpath = tmp_path / "liar.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("a.png", png_bytes())
    with zipfile.ZipFile(zpath) as z:
        info = z.infolist()[0]
    with pytest.raises(ds.DatasetError, match="declares"):
        ds._read_exactly("liar.zip", "a.png", io.BytesIO(b"x" * (info.file_size + 5)), info.file_size)


def test_huge_image_dimensions_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "MAX_IMAGE_PIXELS", 100)
    root = write_folder(tmp_path / "set", {"big.png": png_bytes((11, 10))})
    with pytest.raises(ds.DatasetError, match="'big.png' is 11x10"):
        ds.read_dataset(root)


@pytest.mark.parametrize("files,message", [
    ({}, "holds no images"),
    ({"readme.md": b"hi", "a.txt": b"caption only"}, "holds no images"),
    ({"broken.png": b"\x89PNG not really"}, "cannot read image 'broken.png'"),
    ({"a.png": png_bytes(), "a.txt": b"\xff\xfe\xfa"}, "caption 'a.txt' is not UTF-8"),
])
def test_bad_folders_give_errors_naming_the_problem(tmp_path, files, message):
    root = write_folder(tmp_path / "set", files)
    with pytest.raises(ds.DatasetError, match=message):
        ds.read_dataset(root)


def test_missing_or_non_dataset_path(tmp_path):
    with pytest.raises(ds.DatasetError, match="not found"):
        ds.read_dataset(str(tmp_path / "nope"))
    (tmp_path / "x.png").write_bytes(png_bytes())
    with pytest.raises(ds.DatasetError, match="neither a folder"):
        ds.read_dataset(str(tmp_path / "x.png"))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ds.DatasetError, match="unreadable"):
        ds.read_dataset(str(tmp_path / "bad.zip"))


def test_compose_caption_prepends_the_trigger_word():
    assert ds.compose_caption("TOK", "a dog") == "TOK, a dog"
    assert ds.compose_caption("TOK", None) == "TOK"
    assert ds.compose_caption("", "a dog") == "a dog"


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_buckets_are_multiples_of_16_near_the_target_area(resolution):
    buckets = ds.bucket_sizes(resolution)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= resolution ** 2
        assert max(w / h, h / w) <= 4
        if resolution >= 512:
            assert w * h >= 0.8 * resolution ** 2


def test_images_go_to_the_bucket_of_their_aspect_and_are_cropped_to_it():
    buckets = ds.bucket_sizes(512)
    assert ds.nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = ds.nearest_bucket(1920, 1080, buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.15
    image = Image.new("RGB", (1920, 1080), (1, 2, 3))
    fitted = ds.fit_to_bucket(image, (w, h))
    assert fitted.size == (w, h)
    tensor = ds.image_to_tensor(fitted)
    assert tensor.shape == (h, w, 3) and abs(tensor[0, 0, 2].item() - 3 / 255) < 1e-6


def test_bad_resolution_is_refused():
    with pytest.raises(ds.DatasetError, match="multiple of 16"):
        ds.bucket_sizes(500)


# --- edit pairs ----------------------------------------------------------------------------------


def test_edit_pairs_join_each_target_with_the_control_of_its_stem(tmp_path):
    root = write_folder(tmp_path / "pairs", {
        "a.png": png_bytes(color=(255, 0, 0)), "a.txt": b"make it red",
        "control/a.jpg": png_bytes(color=(0, 0, 255)),
        "10_x/b.png": png_bytes(color=(0, 255, 0)), "10_x/b.txt": b"make it green",
        "10_x/control/b.webp": png_bytes(size=(32, 32), color=(9, 9, 9)),
        "control/notes.txt": b"ignored",
    })
    samples = ds.read_dataset(root)
    assert [(s.name, s.control_name, s.caption, s.repeats) for s in samples] == [
        ("10_x/b.png", "10_x/control/b.webp", "make it green", 10), ("a.png", "control/a.jpg", "make it red", 1)]
    assert samples[0].control.mode == "RGB" and samples[0].control.size == (32, 32)
    assert samples[1].control.getpixel((0, 0))[2] > 200  # the blue control, not the red target


def test_plain_datasets_have_no_control():
    assert ds.pair_controls("set", ["a.png", "sub/b.png"]) == {}
    assert ds.control_target("a.png") is None and ds.control_target("x/Control/a.png") == "x/a.png"
    assert ds.control_target("control/sub/a.png") == "sub/a.png"


@pytest.mark.parametrize("names, message", [
    (["a.png", "b.png", "control/a.png"], r"'b.png' \(put one of the same name in 'control/'"),
    (["a.png", "control/a.png", "control/c.png"], r"control image\(s\) without a target.*'control/c.png'.*'c.png'"),
    (["a.png", "control/a.png", "control/a.jpg"], r"'control/a.jpg' and 'control/a.png' are both control images"),
    (["x/a.png", "control/a.png"], r"without a target.*'control/a.png'"),
])
def test_broken_edit_pairs_are_refused_naming_the_files(names, message):
    with pytest.raises(ds.DatasetError, match=message):
        ds.pair_controls("set", sorted(names))


def test_unreadable_control_is_named(tmp_path):
    root = write_folder(tmp_path / "pairs", {"a.png": png_bytes(), "control/a.png": b"not a png"})
    with pytest.raises(ds.DatasetError, match=r"cannot read image 'control/a.png'"):
        ds.read_dataset(root)


def test_edit_pairs_in_an_archive(tmp_path):
    zpath = tmp_path / "pairs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("set/a.png", png_bytes(color=(255, 0, 0)))
        z.writestr("set/a.txt", "make it red")
        z.writestr("set/control/a.png", png_bytes(color=(0, 0, 255)))
    (sample,) = ds.read_dataset(str(zpath))
    assert (sample.name, sample.control_name, sample.caption) == ("set/a.png", "set/control/a.png", "make it red")
    assert sample.control.getpixel((0, 0)) == (0, 0, 255)
