"""Training images with same-name .txt captions, from a folder or a .zip/.tar archive.

Edit pairs (Kontext, FLUX.2 edit): a folder named `control` holds the control image (the image
before the edit) of each target image in the folder beside it, under the target's stem with any
image extension (`a.png` <- `control/a.jpg`; `10_x/b.png` <- `10_x/control/b.png`; ai-toolkit's
`control_path` layout); the target's caption is the instruction. Once any control exists, every
target needs one.

Archives are read in memory, never extracted: a member's name only pairs an image with its
caption, yet names that would escape the archive's folder, links and special files are refused,
and the declared sizes are summed against a budget before anything is read.
"""

from __future__ import annotations

import io
import logging
import lzma
import math
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from .errors import user_facing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_DATASET_BYTES = 4 << 30  # uncompressed total of a dataset's images and captions
MAX_DATASET_FILES = 100_000  # images and captions: an archive of millions of tiny members is refused
MAX_CAPTION_BYTES = 64 << 10
_READ_CHUNK = 1 << 20
_TAR_MODES = ((".tar.gz", "r:gz"), (".tgz", "r:gz"), (".tar.bz2", "r:bz2"), (".tar.xz", "r:xz"))
MAX_IMAGE_PIXELS = 64_000_000  # a 8000x8000 photo passes; a decompression bomb does not
# kohya's repeat folders: `10_dog/` means its images are drawn ten times as often.
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 1000
# FLUX latents are 1/8 of the image and are cut into 2x2 patches.
SIDE_MULTIPLE = 16
MAX_ASPECT = 4.0
# The folder of edit pairs' control images (matched without case, as ai-toolkit's users name it).
CONTROL_FOLDER = "control"

log = logging.getLogger(__name__)


@user_facing
class DatasetError(ValueError):
    pass


@dataclass
class Sample:
    name: str  # path inside the dataset, for messages
    image: Image.Image  # RGB
    caption: str | None  # None: no caption file
    repeats: int = 1  # from a kohya repeat folder (`10_name/`): relative sampling weight
    control: Image.Image | None = None  # edit pairs: the image before the edit (RGB), else None
    control_name: str | None = None


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_EXTENSIONS)


def read_dataset(path: str, max_bytes: int = MAX_DATASET_BYTES) -> list[Sample]:
    """Images and their captions (and control images: edit pairs), sorted by name. Raises
    DatasetError naming the bad file."""
    label = dataset_label(path)
    files = dict(iter_dataset_files(path, IMAGE_EXTENSIONS, max_bytes))
    images = [name for name in sorted(files) if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    controls = pair_controls(label, images)
    samples, uncaptioned = [], []
    for name in images:
        if control_target(name) is not None:
            continue
        stem = os.path.splitext(name)[0]
        image = normalize_image(decode_image(label, name, files[name]))
        caption_bytes = files.get(stem + CAPTION_EXTENSION)
        caption = None if caption_bytes is None else decode_caption(label, stem + CAPTION_EXTENSION, caption_bytes)
        if caption is None:
            uncaptioned.append(name)
        control_name = controls.get(name)
        control = None if control_name is None else normalize_image(decode_image(label, control_name, files[control_name]))
        samples.append(Sample(name, image, caption, repeat_count(label, name), control, control_name))
    if not samples:
        raise DatasetError(f"dataset {label!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if uncaptioned:
        log.warning(
            "dataset %r: %d image(s) have no caption and train on the trigger word alone: %s",
            label, len(uncaptioned), ", ".join(uncaptioned[:5]),
        )
    return samples


def control_target(name: str) -> str | None:
    """The target path a control image `name` stands for (its innermost `control` folder taken out:
    `x/control/a.png` -> `x/a.png`), or None when `name` is not inside a control folder."""
    parts = name.split("/")
    folders = [i for i, part in enumerate(parts[:-1]) if part.lower() == CONTROL_FOLDER]
    if not folders:
        return None
    return "/".join(parts[:folders[-1]] + parts[folders[-1] + 1:])


def pair_controls(label: str, names: list[str]) -> dict[str, str]:
    """target image name -> its control image name, from a dataset's image names (targets and
    controls together). Without control images, {}; with any, every target needs exactly one and
    every control a target, else DatasetError naming the files."""
    targets, controls = [], {}
    for name in names:
        target = control_target(name)
        if target is None:
            targets.append(name)
            continue
        stem = os.path.splitext(target)[0]
        if stem in controls:
            raise DatasetError(f"dataset {label!r}: {controls[stem]!r} and {name!r} are both control images of "
                               f"{stem!r}; keep one")
        controls[stem] = name
    if not controls:
        return {}
    target_stems = {os.path.splitext(t)[0] for t in targets}
    orphans = [name for stem, name in sorted(controls.items()) if stem not in target_stems]
    if orphans:
        raise DatasetError(
            f"dataset {label!r}: control image(s) without a target image of the same name beside their "
            f"{CONTROL_FOLDER}/ folder: {_listed(orphans)} (expected e.g. {control_target(orphans[0])!r})")
    unpaired = [t for t in targets if os.path.splitext(t)[0] not in controls]
    if unpaired:
        folder = posixpath.join(posixpath.dirname(unpaired[0]), CONTROL_FOLDER)
        raise DatasetError(
            f"dataset {label!r} holds edit pairs (control images), but target image(s) have no control image: "
            f"{_listed(unpaired)} (put one of the same name in {folder + '/'!r}, or move the target out)")
    return {t: controls[os.path.splitext(t)[0]] for t in targets}


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(map(repr, names[:most])) + (f" and {len(names) - most} more" if len(names) > most else "")


def dataset_label(path: str) -> str:
    return os.path.basename(path.rstrip("/\\")) or path


def iter_dataset_files(path: str, extensions, max_bytes: int = MAX_DATASET_BYTES,
                       skipped: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name inside the dataset, bytes) of its files with `extensions` or `.txt`, one at a time,
    after the safety checks (no escaping names, no links, size and file-count budgets) have passed
    for all of them. Other files are listed in `skipped` when given."""
    label = dataset_label(path)
    wanted = (*extensions, CAPTION_EXTENSION)
    if os.path.isdir(path):
        return _folder_files(path, max_bytes, wanted, skipped)
    if os.path.isfile(path) and is_archive(path):
        return _archive_files(path, max_bytes, wanted, skipped)
    if os.path.exists(path):
        raise DatasetError(f"dataset {label!r} is neither a folder nor a {'/'.join(ARCHIVE_EXTENSIONS)} archive")
    raise DatasetError(f"dataset {label!r} not found")


def repeat_count(label: str, name: str) -> int:
    """kohya's repeats: the innermost folder of `name` called `<N>_<anything>` gives N (else 1)."""
    for folder in reversed(name.split("/")[:-1]):
        match = REPEAT_FOLDER.match(folder)
        if match:
            repeats = int(match.group(1))
            if not 1 <= repeats <= MAX_REPEATS:
                raise DatasetError(
                    f"dataset {label!r}: folder {folder!r} reads as {repeats} repeats (kohya's <N>_<name>); "
                    f"use 1 to {MAX_REPEATS}, or rename the folder")
            return repeats
    return 1


def _folder_files(root: str, max_bytes: int, wanted, skipped) -> Iterator[tuple[str, bytes]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise DatasetError(f"dataset file {_rel(root, full)!r} is a symbolic link; copy the file in instead")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if _is_candidate(f, wanted):
                entries.append(os.path.join(dirpath, f))
            elif skipped is not None and not f.startswith("."):
                skipped.append(_rel(root, os.path.join(dirpath, f)))
    _check_budget(root, sum(os.path.getsize(f) for f in entries), max_bytes, len(entries))
    for full in sorted(entries):
        with open(full, "rb") as f:
            yield _rel(root, full), f.read()


def _archive_files(path: str, max_bytes: int, wanted, skipped) -> Iterator[tuple[str, bytes]]:
    label = os.path.basename(path)
    try:
        if path.lower().endswith(".zip"):
            yield from _zip_files(path, label, max_bytes, wanted, skipped)
        else:
            yield from _tar_files(path, label, max_bytes, wanted, skipped)
    # zlib/lzma: corrupt compressed data; NotImplementedError: an unknown compression method;
    # RuntimeError: an encrypted zip member; UnicodeDecodeError: a zip member name flagged UTF-8 that is not
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError,
            NotImplementedError, RuntimeError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset archive {label!r} is unreadable: {e}") from e


def _zip_files(path: str, label: str, max_bytes: int, wanted, skipped) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        members = []
        for info in archive.infolist():
            name = _safe_member_name(label, info.filename)  # first: is_dir() fails on an empty name
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"dataset archive {label!r}: {info.filename!r} is a symbolic link")
            if _is_candidate(name, wanted):
                members.append((name, info))
            elif skipped is not None:
                skipped.append(name)
        _check_budget(label, sum(info.file_size for _, info in members), max_bytes, len(members))
        for name, info in members:
            with archive.open(info) as f:
                yield name, _read_exactly(label, name, f, info.file_size)


def _tar_files(path: str, label: str, max_bytes: int, wanted, skipped) -> Iterator[tuple[str, bytes]]:
    # The extension names the compression: "r:*" would try every decompressor on any file.
    mode = next((m for ext, m in _TAR_MODES if path.lower().endswith(ext)), "r:")
    with tarfile.open(path, mode) as archive:
        members, total = [], 0
        for member in archive:  # headers only; stops early if the budget is exceeded
            name = _safe_member_name(label, member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise DatasetError(f"dataset archive {label!r}: {member.name!r} is a link or special file")
            if _is_candidate(name, wanted):
                total += member.size
                members.append((name, member))
                _check_budget(label, total, max_bytes, len(members))
            elif skipped is not None:
                skipped.append(name)
        for name, member in members:
            f = archive.extractfile(member)
            yield name, _read_exactly(label, name, f, member.size)


def _safe_member_name(label: str, raw: str) -> str:
    if not raw:
        raise DatasetError(f"dataset archive {label!r} has a member with an empty name")
    name = raw.replace("\\", "/")
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal == ".." or normal.startswith("../") or ":" in name.split("/")[0]:
        raise DatasetError(f"dataset archive {label!r}: member {raw!r} points outside the archive's folder")
    return normal


def _is_candidate(name: str, wanted) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in wanted


def _check_budget(label: str, total: int, max_bytes: int, count: int) -> None:
    if total > max_bytes:
        raise DatasetError(
            f"dataset {label!r} declares {total / 2**20:.0f} MiB of files, over the {max_bytes / 2**20:.0f} MiB budget"
        )
    if count > MAX_DATASET_FILES:
        raise DatasetError(f"dataset {label!r} holds over {MAX_DATASET_FILES} image and caption files")


def _read_exactly(label: str, name: str, f, size: int) -> bytes:
    # In chunks: one read(size) allocates the declared size up front, and a 10 KB archive can
    # declare a 4 GB member. One byte more than declared reveals a member larger than its header.
    chunks, total = [], 0
    while total <= size and (chunk := f.read(min(_READ_CHUNK, size + 1 - total))):
        chunks.append(chunk)
        total += len(chunk)
    data = b"".join(chunks)
    if len(data) != size:
        raise DatasetError(f"dataset archive {label!r}: {name!r} is not the size its header declares")
    return data


def _rel(root: str, full: str) -> str:
    return os.path.relpath(full, root).replace(os.sep, "/")


def decode_image(label: str, name: str, data: bytes) -> Image.Image:
    """The decoded image (first frame), as stored: any mode, no orientation applied."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"dataset {label!r}: image {name!r} is {image.width}x{image.height}, over {MAX_IMAGE_PIXELS} pixels"
            )
        image.load()
    except DatasetError:
        raise
    except Exception as e:  # Pillow raises many types for corrupt data
        raise DatasetError(f"dataset {label!r}: cannot read image {name!r}: {e}") from e
    return image


BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


def normalize_image(image: Image.Image, background: str = "white") -> Image.Image:
    """8-bit RGB the right way up: EXIF orientation applied, transparency flattened onto
    `background`, CMYK/palette/greyscale converted, 16-bit and float scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = image.convert("F")
        high = image.getextrema()[1]
        # 16-bit samples span 0..65535; float ones 0..1; anything at most 255 is already 8-bit.
        scale = 1 / 257 if high > 255 else 255.0 if high <= 1.0 else 1.0
        image = image.point(lambda v: v * scale + 0.5).convert("L")  # rounded, not truncated
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUNDS[background], 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def decode_caption(label: str, name: str, data: bytes) -> str:
    _check_caption_size(label, name, data)
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {label!r}: caption {name!r} is not UTF-8 text: {e}") from e


# Tried in turn: UTF-8, then what Notepad and most Windows tools write in Western Europe and the
# Americas, then Latin-1, which reads any byte (so the last one never fails).
CAPTION_ENCODINGS = (("utf-8-sig", "UTF-8"), ("cp1252", "Windows-1252"), ("latin-1", "Latin-1"))


def decode_caption_any(label: str, name: str, data: bytes) -> tuple[str, str]:
    """The caption and the encoding it was read in, for files that need not be UTF-8."""
    _check_caption_size(label, name, data)
    for codec, shown in CAPTION_ENCODINGS:
        try:
            return data.decode(codec).strip(), shown
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _check_caption_size(label: str, name: str, data: bytes) -> None:
    if len(data) > MAX_CAPTION_BYTES:
        raise DatasetError(f"dataset {label!r}: caption {name!r} is over {MAX_CAPTION_BYTES // 1024} KiB")


def compose_caption(trigger_word: str, caption: str | None) -> str:
    """kohya's convention: the trigger word leads the caption, unless the caption already holds it
    (placed where the user wrote it, e.g. by FluxQPrepareDataset)."""
    trigger, caption = trigger_word.strip(), (caption or "").strip()
    if trigger and has_word(caption, trigger):
        return caption
    return ", ".join(p for p in (trigger, caption) if p)


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution**2 pixels, sides multiples of 16, aspect <= 4.

    Widths step by resolution/8 (rounded to 16), so similar aspect ratios share a bucket.
    """
    if resolution < SIDE_MULTIPLE or resolution % SIDE_MULTIPLE:
        raise DatasetError(f"resolution must be a positive multiple of {SIDE_MULTIPLE}, got {resolution}")
    stride = max(SIDE_MULTIPLE, resolution // 8 // SIDE_MULTIPLE * SIDE_MULTIPLE)
    area = resolution * resolution
    buckets = set()
    width = resolution
    while width >= SIDE_MULTIPLE:
        height = area // width // SIDE_MULTIPLE * SIDE_MULTIPLE
        if height >= SIDE_MULTIPLE and width / height <= MAX_ASPECT and height / width <= MAX_ASPECT:
            buckets.update({(width, height), (height, width)})
        width -= stride
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket, then centre-crop to it."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) float in [0, 1]: ComfyUI's IMAGE layout without the batch dimension."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3).float() / 255.0
