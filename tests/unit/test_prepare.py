"""lora_ops.prepare: mixed photos to a clean training set, and the captions written into it."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from caption_stub import CaptionStub
from PIL import Image

from lora_ops import captioning as cap
from lora_ops import dataset as ds
from lora_ops import flow_match as fm
from lora_ops import prepare as prep


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise_image(seed: int, size=(320, 256), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def write(root, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def prepared(tmp_path, files, **options):
    source = write(tmp_path / "src", files)
    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    report = prep.Report()
    images = prep.build_prepared_set(source, str(tmp_path / "out"), prep.PrepareOptions(**options), report)
    assert {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()} == before, "source untouched"
    return images, report, tmp_path / "out"


def test_every_format_becomes_upright_8bit_rgb_png(tmp_path):
    photo = noise_image(1, (400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 clockwise to display
    transparent = Image.new("RGBA", (256, 256), (255, 0, 0, 0))
    transparent.paste((0, 0, 255, 255), (0, 0, 128, 256))
    palette = noise_image(2, (256, 256)).convert("P", palette=Image.Palette.ADAPTIVE)
    deep = Image.fromarray(np.full((256, 300), 40000, np.uint16))
    cmyk = Image.new("CMYK", (256, 256), (0, 255, 255, 0))
    gif = [Image.new("P", (256, 256), 1), Image.new("P", (256, 256), 2)]
    gif[0].putpalette([0, 0, 0, 0, 200, 0, 200, 0, 0] + [0] * 759)
    files = {
        "phone.jpg": encoded(photo, "JPEG", exif=exif, quality=95),
        "alpha.png": encoded(transparent, "PNG"),
        "pal.png": encoded(palette, "PNG"),
        "deep.png": encoded(deep, "PNG"),
        "print.tiff": encoded(cmyk, "TIFF"),
        "anim.gif": encoded(gif[0], "GIF", save_all=True, append_images=gif[1:]),
        "web.webp": encoded(noise_image(3, (256, 256)), "WEBP", lossless=True),
        "old.bmp": encoded(noise_image(4, (256, 256)), "BMP"),
        "notes.pdf": b"%PDF-1.4 not an image", "movie.mp4": b"\x00" * 10,
    }
    images, report, out = prepared(tmp_path, files, background="black")
    assert sorted(i.name for i in images) == sorted(os.path.splitext(n)[0] + ".png" for n in files
                                                    if n.endswith(("jpg", "png", "tiff", "gif", "webp", "bmp")))
    assert pixels(out / "phone.png").shape == (400, 300, 3)  # turned upright: 300 wide, 400 high
    alpha = pixels(out / "alpha.png")
    assert tuple(alpha[0, 0]) == (0, 0, 255) and tuple(alpha[0, 255]) == (0, 0, 0)  # flattened on black
    assert tuple(pixels(out / "deep.png")[0, 0]) == (156, 156, 156)  # 40000 / 257 rounded
    assert tuple(pixels(out / "print.png")[0, 0]) == (255, 0, 0)
    assert tuple(pixels(out / "anim.png")[0, 0]) == (0, 200, 0)  # the first frame
    assert np.array_equal(pixels(out / "web.png"), np.asarray(noise_image(3, (256, 256))))  # lossless stays exact
    assert report.counts[prep.WRITTEN] == 8
    assert report.counts[prep.UNREADABLE] == 0 and report.counts[prep.IGNORED] == 2  # pdf has no Pillow opener
    assert "other files ignored: 2 (movie.mp4, notes.pdf)" in report.summary()


def test_duplicates_small_images_and_broken_files_are_dropped_and_reported(tmp_path):
    a = noise_image(5)
    files = {
        "a.png": encoded(a, "PNG"), "copy_of_a.bmp": encoded(a, "BMP"),  # same pixels, other format
        "thumb.png": encoded(noise_image(6, (200, 120)), "PNG"),
        "broken.jpg": b"\xff\xd8\xff\xe0 truncated", "phone.heic": b"\x00\x00\x00\x18ftypheic",
        "big.png": encoded(noise_image(7, (1000, 500)), "PNG"),
    }
    images, report, out = prepared(tmp_path, files, min_side=128, max_side=400)
    assert sorted(i.name for i in images) == ["a.png", "big.png"]
    assert report.names[prep.DUPLICATE] == ["copy_of_a.bmp = a.png"]
    assert report.names[prep.TOO_SMALL] == ["thumb.png 200x120"]
    assert report.names[prep.UNREADABLE] == ["broken.jpg"]
    assert report.names[prep.NEEDS_HEIF] == ["phone.heic"]  # pillow-heif is not installed here
    assert Image.open(out / "big.png").size == (400, 200)  # long side capped
    summary = report.summary()
    for line in ("images written: 2", "exact duplicates dropped: 1", "below min_side dropped: 1",
                 "unreadable images dropped: 1", "HEIC skipped (pip install pillow-heif): 1 (phone.heic)"):
        assert line in summary


def test_repeat_folders_and_captions_keep_their_place(tmp_path):
    files = {"10_dog/a.jpg": encoded(noise_image(8), "JPEG"), "10_dog/a.txt": b"a dog",
             "1_cat/b.png": encoded(noise_image(9), "PNG"), "1_cat/b.txt": b"a cat",
             "1_cat/b.jpg": encoded(noise_image(10), "JPEG")}
    images, _, out = prepared(tmp_path, files)
    assert {(i.name, i.source_caption) for i in images} == {
        ("10_dog/a.png", "a dog"), ("1_cat/b.png", "a cat"), ("1_cat/b_png.png", "a cat")}
    assert os.path.isfile(out / prep.MARKER_FILE)
    prep.write_captions(str(out), images, mode="keep", style=prep.CaptionStyle(), report=prep.Report())
    samples = ds.read_dataset(str(out))
    assert [(s.name, s.caption, s.repeats) for s in samples] == [
        ("10_dog/a.png", "a dog", 10), ("1_cat/b.png", "a cat", 1), ("1_cat/b_png.png", "a cat", 1)]


def test_archives_are_read_with_the_trainers_safety_rules(tmp_path):
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("set/5_me/x.png", encoded(noise_image(11), "PNG"))
        z.writestr("set/5_me/x.txt", "me")
    report = prep.Report()
    images = prep.build_prepared_set(str(zpath), str(tmp_path / "out"), prep.PrepareOptions(), report)
    assert [(i.name, i.source_caption) for i in images] == [("set/5_me/x.png", "me")]
    assert ds.repeat_count("set", images[0].name) == 5

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("../../x.png")
        data = encoded(noise_image(12), "PNG")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(ds.DatasetError, match="points outside"):
        prep.build_prepared_set(str(evil), str(tmp_path / "out2"), prep.PrepareOptions(), prep.Report())
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_symlinks_are_refused(tmp_path):
    write(tmp_path / "src", {"a.png": encoded(noise_image(13), "PNG")})
    os.symlink("/etc/hostname", tmp_path / "src" / "link.png")
    with pytest.raises(ds.DatasetError, match="symbolic link"):
        prep.build_prepared_set(str(tmp_path / "src"), str(tmp_path / "out"), prep.PrepareOptions(), prep.Report())


def test_bad_repeat_folder_and_foreign_output_folder_are_refused(tmp_path):
    write(tmp_path / "src", {"2024_holiday/a.png": encoded(noise_image(14), "PNG")})
    with pytest.raises(ds.DatasetError, match="'2024_holiday' reads as 2024 repeats"):
        prep.build_prepared_set(str(tmp_path / "src"), str(tmp_path / "out"), prep.PrepareOptions(), prep.Report())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    write(tmp_path / "ok", {"a.png": encoded(noise_image(14), "PNG")})
    with pytest.raises(prep.PrepareError, match="'mine' already exists and was not written by FluxQPrepareDataset"):
        prep.build_prepared_set(str(tmp_path / "ok"), str(tmp_path / "mine"), prep.PrepareOptions(), prep.Report())
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"
    with pytest.raises(prep.PrepareError, match="no usable image"):
        prep.build_prepared_set(str(tmp_path / "src" / "2024_holiday"), str(tmp_path / "o3"),
                                prep.PrepareOptions(min_side=4096), prep.Report())


def test_rerun_replaces_its_own_folder(tmp_path):
    images, _, out = prepared(tmp_path, {"a.png": encoded(noise_image(15), "PNG"), "b.png": encoded(noise_image(16), "PNG")})
    (tmp_path / "src" / "b.png").unlink()
    images = prep.build_prepared_set(str(tmp_path / "src"), str(out), prep.PrepareOptions(), prep.Report())
    assert [i.name for i in images] == ["a.png"] and not (out / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no build or old folder left


def zipped(path, members: list[tuple[str, bytes]]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return str(path)


@pytest.mark.filterwarnings("ignore:Duplicate name")  # a zip may hold a name twice; zipfile warns
def test_output_names_never_collide_whatever_the_case_or_order(tmp_path):
    photos = {f"IMG_1.{ext}": encoded(noise_image(30 + n), "JPEG") for n, ext in enumerate(("jpg", "JPG", "Jpg"))}
    photos.update({"a.jpg": encoded(noise_image(40), "JPEG"), "a.png": encoded(noise_image(41), "PNG"),
                   "a_png.png": encoded(noise_image(42), "PNG")})
    images, report, out = prepared(tmp_path, photos)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(names) == len({n.casefold() for n in names}) == len(images) == 6, names
    assert len({i.pixel_hash for i in images}) == 6  # six different photos, none written over
    # in name order: IMG_1.JPG, IMG_1.Jpg, IMG_1.jpg, a.jpg, a.png, a_png.png
    assert report.names[prep.RENAMED] == ["IMG_1.Jpg -> IMG_1_jpg.png", "IMG_1.jpg -> IMG_1_jpg_2.png",
                                          "a.png -> a_png.png", "a_png.png -> a_png_png.png"]

    members = [(name, encoded(noise_image(50 + n), "PNG"))
               for n, name in enumerate(["a_jpg.png", "a.JPG", "a.jpg", "a.png", "a.png"])]  # a name twice, too
    for order in (members, members[::-1]):
        report = prep.Report()
        images = prep.build_prepared_set(zipped(tmp_path / "set.zip", order), str(tmp_path / "zip_out"),
                                         prep.PrepareOptions(), report)
        files = list((tmp_path / "zip_out").rglob("*.png"))
        assert len(files) == len(images) == 5 and len({i.pixel_hash for i in images}) == 5
        shutil.rmtree(tmp_path / "zip_out")


def test_captions_that_are_not_utf8_are_converted_and_reported(tmp_path):
    files = {"a.png": encoded(noise_image(60), "PNG"), "a.txt": "café crème, naïve".encode("cp1252"),
             "b.png": encoded(noise_image(61), "PNG"), "b.txt": b"\x81 odd byte \xe9",  # 0x81: not cp1252
             "c.png": encoded(noise_image(62), "PNG"), "c.txt": "plain ütf-8".encode("utf-8-sig")}
    images, report, out = prepared(tmp_path, files)
    assert {i.name: i.source_caption for i in images} == {
        "a.png": "café crème, naïve", "b.png": "\x81 odd byte é", "c.png": "plain ütf-8"}
    assert report.names[prep.RECODED] == ["a.txt read as Windows-1252", "b.txt read as Latin-1"]
    prep.write_captions(str(out), images, mode="keep", style=prep.CaptionStyle(), report=prep.Report())
    assert [s.caption for s in ds.read_dataset(str(out))] == ["café crème, naïve", "\x81 odd byte é", "plain ütf-8"]


def test_a_rerun_keeps_captions_edited_in_the_prepared_folder(tmp_path):
    images, _, out = colour_set(tmp_path, {"r": "my red"})
    prep.write_captions(str(out), images, mode="fill", style=prep.CaptionStyle(), report=prep.Report(),
                        template="a photo of {trigger}")
    (out / "g.txt").write_text("TOK, my own green words\n", encoding="cp1252")
    (out / "b.txt").unlink()
    (out / "b.txt").write_text("TOK, blue, rewritten\n")
    # the source's image renamed: the edit follows the picture, not the name
    os.replace(tmp_path / "src" / "g.png", tmp_path / "src" / "green.png")
    report = prep.Report()
    images = prep.build_prepared_set(str(tmp_path / "src"), str(out), prep.PrepareOptions(), report)
    prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=report,
                        template="a photo of {trigger}")
    assert captions_of(out) == {"r": "a photo of TOK", "green": "TOK, my own green words", "b": "TOK, blue, rewritten"}
    assert report.counts[prep.EDITED] == 2
    # kept again by the next rerun: an edit stays the user's
    images = prep.build_prepared_set(str(tmp_path / "src"), str(out), prep.PrepareOptions(), prep.Report())
    prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                        template="other {trigger}")
    assert captions_of(out) == {"r": "other TOK", "green": "TOK, my own green words", "b": "TOK, blue, rewritten"}


@pytest.mark.parametrize("change,message", [
    (lambda out, src: (out / "new.png").write_bytes(encoded(noise_image(70), "PNG")),
     r"holds changes a rerun would lose: new.png \(not written by FluxQPrepareDataset\)"),
    (lambda out, src: Image.new("RGB", (256, 256), (1, 2, 3)).save(out / "r.png"),
     r"r.png \(changed since it was prepared\)"),
    (lambda out, src: (out / "r.png").unlink(), r"r.png \(deleted since it was prepared\)"),
    (lambda out, src: ((out / "r.txt").write_text("edited"), (src / "r.png").unlink()),
     r"caption\(s\) edited there belong to images that this run no longer writes .*: r.txt"),
])
def test_a_rerun_refuses_to_lose_any_other_change(tmp_path, change, message):
    images, _, out = colour_set(tmp_path)
    prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                        template="t")
    change(out, tmp_path / "src")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(prep.PrepareError, match=message):
        prep.build_prepared_set(str(tmp_path / "src"), str(out), prep.PrepareOptions(), prep.Report())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_folder_and_an_archive_of_the_same_name_do_not_replace_each_others_set(tmp_path):
    write(tmp_path / "photos", {"a.png": encoded(noise_image(80), "PNG")})
    zipped(tmp_path / "photos.zip", [("b.png", encoded(noise_image(81), "PNG"))])
    prep.build_prepared_set(str(tmp_path / "photos"), str(tmp_path / "photos_prepared"), prep.PrepareOptions(),
                            prep.Report())
    with pytest.raises(prep.PrepareError, match="'photos_prepared' was prepared from 'photos', not from 'photos.zip'"):
        prep.build_prepared_set(str(tmp_path / "photos.zip"), str(tmp_path / "photos_prepared"),
                                prep.PrepareOptions(), prep.Report())
    assert [p.name for p in (tmp_path / "photos_prepared").glob("*.png")] == ["a.png"]


@pytest.mark.parametrize("style,text,expected", [
    (prep.CaptionStyle("TOK", "start"), "a dog on grass", "TOK, a dog on grass"),
    (prep.CaptionStyle("TOK", "end"), "a dog on grass", "a dog on grass, TOK"),
    (prep.CaptionStyle("TOK", "none"), "a dog on grass", "a dog on grass"),
    (prep.CaptionStyle("TOK", "start", "photo of {trigger},", "35mm"), "a dog", "photo of TOK, a dog 35mm"),
    (prep.CaptionStyle("TOK", "start"), "a photo of TOK", "a photo of TOK"),  # never twice
    (prep.CaptionStyle("", "start"), "a dog", "a dog"),
])
def test_caption_style_places_the_trigger_once(style, text, expected):
    assert style.apply(text) == expected
    assert ds.compose_caption("TOK", expected) == (expected if "TOK" in expected else f"TOK, {expected}")


def colour_set(tmp_path, captions=None):
    colours = {"r": (230, 20, 20), "g": (20, 220, 30), "b": (20, 30, 230)}
    files = {f"{n}.png": encoded(Image.new("RGB", (256, 256), c), "PNG") for n, c in colours.items()}
    files.update({f"{n}.txt": t.encode() for n, t in (captions or {}).items()})
    return prepared(tmp_path, files)


def captions_of(out) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in sorted(out.glob("*.txt"))}


def test_modes_keep_fill_overwrite_with_a_template(tmp_path):
    images, _, out = colour_set(tmp_path, {"r": "my red"})
    for mode, expected in [("keep", {"r": "my red"}),
                           ("fill", {"r": "my red", "g": "a photo of TOK", "b": "a photo of TOK"}),
                           ("overwrite", {"r": "a photo of TOK", "g": "a photo of TOK", "b": "a photo of TOK"})]:
        for p in out.glob("*.txt"):
            p.unlink()
        report = prep.Report()
        prep.write_captions(str(out), images, mode=mode, style=prep.CaptionStyle(), report=report,
                            template="a photo of {trigger}")
        assert captions_of(out) == expected, mode
    assert report.counts[prep.TEMPLATED] == 3


@pytest.fixture
def stub():
    server = CaptionStub()
    yield server
    server.close()


def vision(stub, **retry):
    settings = cap.EndpointSettings(base_url=stub.base_url, model=stub.model)
    client = cap.VisionCaptioner(settings, "", **{"max_retries": 1, "backoff_s": 0.01, **retry})

    def ask(image, path):
        with Image.open(path) as picture:
            return client.caption(picture)

    return ask, settings.cache_key()


def test_endpoint_captions_arrive_as_files_and_a_rerun_does_not_pay_again(tmp_path, stub):
    images, _, out = colour_set(tmp_path, {"r": "my red"})
    ask, key = vision(stub)
    report = prep.Report()
    prep.write_captions(str(out), images, mode="fill", style=prep.CaptionStyle("TOK", "end"), report=report,
                        captioner=ask, settings_key=key, concurrency=2)
    assert captions_of(out) == {"r": "my red", "g": "a plain green square, TOK", "b": "a plain blue square, TOK"}
    assert sorted(r["colour"] for r in stub.requests) == ["blue", "green"]
    assert report.counts[prep.KEPT] == 1 and report.counts[prep.GENERATED] == 2

    # prepared again (the folder is rebuilt) and captioned in overwrite mode: only red is new
    images = prep.build_prepared_set(str(tmp_path / "src"), str(out), prep.PrepareOptions(), prep.Report())
    report = prep.Report()
    prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle("TOK", "start"), report=report,
                        captioner=ask, settings_key=key)
    assert captions_of(out) == {"r": "TOK, a plain red square", "g": "TOK, a plain green square",
                                "b": "TOK, a plain blue square"}
    assert len(stub.requests) == 3 and report.counts[prep.REUSED] == 2

    # another instruction is another request
    _, other = vision(stub)
    changed = json.loads(other)
    changed["instruction"] = "tags please"
    prep.write_captions(str(out), images[:1], mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                        captioner=ask, settings_key=json.dumps(changed))
    assert len(stub.requests) == 4


def wait_for_caption_workers(timeout=5.0):
    deadline = time.monotonic() + timeout
    while any(t.name.startswith("fluxq-caption") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "caption workers still running"
        time.sleep(0.02)


def test_failed_images_fail_or_are_skipped_and_finished_ones_are_kept(tmp_path, stub):
    images, _, out = colour_set(tmp_path)
    ask, key = vision(stub)
    stub.script = [("malformed", b"oops")]
    with pytest.raises(cap.CaptionError, match="malformed"):
        prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                            captioner=ask, settings_key=key, concurrency=1)
    written = captions_of(out)
    wait_for_caption_workers()  # the failed run does not wait for them; their requests land late
    stub.requests.clear()
    stub.script = [("malformed", b"oops")]
    report = prep.Report()
    prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=report,
                        captioner=ask, settings_key=key, on_failure="skip", concurrency=1)
    assert len(stub.requests) == 3 - len(written)  # what the failed run finished is not asked again
    assert report.counts[prep.FAILED] == 1 and len(captions_of(out)) == 2
    assert "captions failed (left without): 1" in report.summary()


def test_an_unreachable_endpoint_stops_even_when_skipping(tmp_path):
    images, _, out = colour_set(tmp_path)
    client = cap.VisionCaptioner(cap.EndpointSettings(base_url="http://127.0.0.1:9/v1", model="m"), "")
    with pytest.raises(cap.EndpointError, match="cannot reach"):
        prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                            captioner=lambda image, path: client.caption(Image.open(path)),
                            settings_key="k", on_failure="skip")


@pytest.mark.parametrize("script", [[("status", 429, {"Retry-After": "30"})] * 3, [("sleep", 30.0)] * 3],
                         ids=["retry-after", "slow-endpoint"])
def test_cancel_ends_the_run_at_once_while_workers_wait(tmp_path, stub, script):
    images, _, out = colour_set(tmp_path)
    client = cap.VisionCaptioner(cap.EndpointSettings(base_url=stub.base_url, model=stub.model), "")
    stub.script = script

    def cancel():  # as ComfyUI's check: raises once the user pressed cancel, nothing else
        if len(stub.requests) == 3:
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        prep.write_captions(str(out), images, mode="overwrite", style=prep.CaptionStyle(), report=prep.Report(),
                            captioner=lambda image, path: client.caption(Image.open(path)),
                            settings_key="k", concurrency=3, check_cancel=cancel, abort=client.abort)
    assert time.monotonic() - started < 3
    assert captions_of(out) == {} and len(stub.requests) == 3


def test_repeats_weight_how_often_the_trainer_draws_an_image():
    """A `3_x/` image listed three times (as FluxQTrainLoRA lists it) is drawn three times as often
    as a `1_y/` one: 200 draws, expected 75 % (binomial sd 3.1 %)."""
    latent = torch.zeros(4, 2, 2)
    a, b = fm.Conditioning(torch.zeros(3, 8), torch.zeros(8)), fm.Conditioning(torch.ones(3, 8), torch.zeros(8))
    weight = torch.zeros(1, requires_grad=True)
    drawn = []

    def predict(x_t, t, context, pooled, reference):
        drawn.extend(context[:, 0, 0].tolist())
        return x_t * weight

    examples = [fm.TrainingExample(latent, a)] * 3 + [fm.TrainingExample(latent, b)]
    trainer = fm.FlowMatchTrainer(predict, examples, None, {"w": weight},
                                  fm.TrainSettings(steps=200, learning_rate=0.0, optimizer="sgd"))
    for step in range(200):
        trainer._micro_batch_loss(trainer._global_micro_batch(fm.step_generator(0, step)), step, 0)
    assert len(drawn) == 200 and 0.62 < drawn.count(0.0) / 200 < 0.88


# --- edit pairs ------------------------------------------------------------------------------


def test_edit_pairs_come_through_as_pairs(tmp_path):
    """Controls are kept when they equal another image or are small, get no caption, and the
    prepared set reads back as the same pairs."""
    target, before = noise_image(1), noise_image(2)
    images, report, out = prepared(tmp_path, {
        "a.jpg": encoded(target, "PNG"), "a.txt": b"make it noisy",
        "control/a.png": encoded(before, "PNG"),
        "b.png": encoded(before, "PNG"), "b.txt": b"keep it",
        "control/b.webp": encoded(before.resize((64, 48)), "PNG"),  # small and the same picture twice
    }, min_side=128)
    prep.write_captions(str(out), images, mode="fill", style=prep.CaptionStyle(), report=report, template="x")
    assert sorted((i.name, i.control) for i in images) == [
        ("a.png", False), ("b.png", False), ("control/a.png", True), ("control/b.png", True)]
    assert not (out / "control" / "a.txt").exists() and not (out / "control" / "b.txt").exists()
    samples = ds.read_dataset(str(out))
    assert [(s.name, s.control_name, s.caption) for s in samples] == [
        ("a.png", "control/a.png", "make it noisy"), ("b.png", "control/b.png", "keep it")]
    assert np.array_equal(np.asarray(samples[0].control), np.asarray(before))
    assert samples[1].control.size == (64, 48)


def test_a_pair_that_loses_its_target_is_refused_naming_it(tmp_path):
    picture = noise_image(3)
    with pytest.raises(prep.PrepareError, match=r"(?s)'control/b.png'.*exact duplicates dropped: 1 \(b.png = a.png\)"):
        prepared(tmp_path, {"a.png": encoded(picture, "PNG"), "b.png": encoded(picture, "PNG"),
                            "control/a.png": encoded(noise_image(4), "PNG"),
                            "control/b.png": encoded(noise_image(5), "PNG")}, min_side=0)
    assert not (tmp_path / "out").exists()


def test_rerun_of_a_prepared_edit_set_keeps_its_edited_captions(tmp_path):
    files = {"a.png": encoded(noise_image(6), "PNG"), "control/a.png": encoded(noise_image(7), "PNG")}
    images, report, out = prepared(tmp_path, files, min_side=0)
    prep.write_captions(str(out), images, mode="fill", style=prep.CaptionStyle(), report=report, template="x")
    (out / "a.txt").write_text("turn it blue")
    images, _, out = prepared(tmp_path, files, min_side=0)
    assert (out / "a.txt").read_text() == "turn it blue\n" and (out / "control" / "a.png").is_file()
