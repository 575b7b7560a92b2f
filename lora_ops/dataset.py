"""Training images with same-name .txt captions, from a folder or a .zip/.tar archive.

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
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_DATASET_BYTES = 4 << 30  # uncompressed total of a dataset's images and captions
MAX_CAPTION_BYTES = 64 << 10
_READ_CHUNK = 1 << 20
_TAR_MODES = ((".tar.gz", "r:gz"), (".tgz", "r:gz"), (".tar.bz2", "r:bz2"), (".tar.xz", "r:xz"))
MAX_IMAGE_PIXELS = 64_000_000  # a 8000x8000 photo passes; a decompression bomb does not
# FLUX latents are 1/8 of the image and are cut into 2x2 patches.
SIDE_MULTIPLE = 16
MAX_ASPECT = 4.0

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


@dataclass
class Sample:
    name: str  # path inside the dataset, for messages
    image: Image.Image  # RGB
    caption: str | None  # None: no caption file


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_EXTENSIONS)


def read_dataset(path: str, max_bytes: int = MAX_DATASET_BYTES) -> list[Sample]:
    """Images and their captions, sorted by name. Raises DatasetError naming the bad file."""
    label = os.path.basename(path.rstrip("/\\")) or path
    if os.path.isdir(path):
        files = dict(_folder_files(path, max_bytes))
    elif os.path.isfile(path) and is_archive(path):
        files = dict(_archive_files(path, max_bytes))
    elif os.path.exists(path):
        raise DatasetError(f"dataset {label!r} is neither a folder nor a {'/'.join(ARCHIVE_EXTENSIONS)} archive")
    else:
        raise DatasetError(f"dataset {label!r} not found")

    samples, ignored, uncaptioned = [], [], []
    for name in sorted(files):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            if ext.lower() != CAPTION_EXTENSION:
                ignored.append(name)
            continue
        image = _decode_image(label, name, files[name])
        caption_bytes = files.get(stem + CAPTION_EXTENSION)
        caption = None if caption_bytes is None else _decode_caption(label, stem + CAPTION_EXTENSION, caption_bytes)
        if caption is None:
            uncaptioned.append(name)
        samples.append(Sample(name, image, caption))
    if not samples:
        raise DatasetError(f"dataset {label!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if ignored:
        log.warning("dataset %r: ignoring %d non-image file(s): %s", label, len(ignored), ", ".join(ignored[:5]))
    if uncaptioned:
        log.warning(
            "dataset %r: %d image(s) have no caption and train on the trigger word alone: %s",
            label, len(uncaptioned), ", ".join(uncaptioned[:5]),
        )
    return samples


def _folder_files(root: str, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise DatasetError(f"dataset file {_rel(root, full)!r} is a symbolic link; copy the file in instead")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        entries += [os.path.join(dirpath, f) for f in filenames if _is_candidate(f)]
    _check_budget(root, sum(os.path.getsize(f) for f in entries), max_bytes)
    for full in entries:
        with open(full, "rb") as f:
            yield _rel(root, full), f.read()


def _archive_files(path: str, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    label = os.path.basename(path)
    try:
        if path.lower().endswith(".zip"):
            yield from _zip_files(path, label, max_bytes)
        else:
            yield from _tar_files(path, label, max_bytes)
    # zlib/lzma: corrupt compressed data; NotImplementedError: an unknown compression method;
    # RuntimeError: an encrypted zip member
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError,
            NotImplementedError, RuntimeError) as e:
        raise DatasetError(f"dataset archive {label!r} is unreadable: {e}") from e


def _zip_files(path: str, label: str, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        members = []
        for info in archive.infolist():
            name = _safe_member_name(label, info.filename)  # first: is_dir() fails on an empty name
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"dataset archive {label!r}: {info.filename!r} is a symbolic link")
            if _is_candidate(name):
                members.append((name, info))
        _check_budget(label, sum(info.file_size for _, info in members), max_bytes)
        for name, info in members:
            with archive.open(info) as f:
                yield name, _read_exactly(label, name, f, info.file_size)


def _tar_files(path: str, label: str, max_bytes: int) -> Iterator[tuple[str, bytes]]:
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
            if _is_candidate(name):
                total += member.size
                _check_budget(label, total, max_bytes)
                members.append((name, member))
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


def _is_candidate(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in (*IMAGE_EXTENSIONS, CAPTION_EXTENSION)


def _check_budget(label: str, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise DatasetError(
            f"dataset {label!r} declares {total / 2**20:.0f} MiB of files, over the {max_bytes / 2**20:.0f} MiB budget"
        )


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


def _decode_image(label: str, name: str, data: bytes) -> Image.Image:
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
    if image.mode == "I":  # 16-bit PNG
        image = image.point(lambda v: v * (1 / 255))
    return image.convert("RGB")


def _decode_caption(label: str, name: str, data: bytes) -> str:
    if len(data) > MAX_CAPTION_BYTES:
        raise DatasetError(f"dataset {label!r}: caption {name!r} is over {MAX_CAPTION_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {label!r}: caption {name!r} is not UTF-8 text: {e}") from e


def compose_caption(trigger_word: str, caption: str | None) -> str:
    """kohya's convention: the trigger word leads the caption."""
    parts = [p for p in (trigger_word.strip(), (caption or "").strip()) if p]
    return ", ".join(parts)


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
