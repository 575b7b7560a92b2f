"""From a folder or archive of mixed photos to a clean training set (FluxQPrepareDataset).

Every image Pillow can open becomes an 8-bit RGB PNG the right way up; exact duplicates (same
pixels) and images below a minimum side are dropped and reported; the folder structure is kept,
so kohya repeat folders (`10_name/`) still weight the images. The source is only read.

Captions are written afterwards, one file at a time, by `write_captions`: kept from the source,
filled from a template, or asked of a vision endpoint (lora_ops.captioning). Replies of the
endpoint are remembered in the set's folder (`.fluxq_captions.jsonl`, keyed by the image's pixels
and the request settings), so a cancelled or failed run resumes without asking again.

A rerun rebuilds the folder but loses nothing the user did there: the marker file records each
image written (its pixels and bytes) and `.fluxq_captions_written.jsonl` each caption written, so
a caption that differs from its record was edited and is carried to the same picture in the new
set; any other change (an edited, added or deleted image, a caption whose picture is gone) stops
the rerun with a message naming the files. A folder prepared from another source is refused.

Edit pairs (`control/` folders, lora_ops.dataset) come through as pairs: control images are
converted like the others but never dropped as duplicates (one control may serve several
targets, or equal its target) nor for their size (the trainer fits them to their target's
bucket), and get no caption (the target's is the instruction); a set whose pairs would not match
afterwards (a half unreadable, dropped or renamed) is refused naming the files.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from PIL import Image

from . import dataset as ds
from .atomic import atomic_path
from .errors import user_facing

log = logging.getLogger(__name__)

MARKER_FILE = ".fluxq_prepared.json"  # says a folder was written by this module (so it may be replaced)
CAPTION_CACHE_FILE = ".fluxq_captions.jsonl"
CAPTION_RECORD_FILE = ".fluxq_captions_written.jsonl"  # what this module wrote, to tell the user's edits apart
HEIC_EXTENSIONS = (".heic", ".heif")
CAPTION_MODES = ("keep", "fill", "overwrite")
TRIGGER_PLACEMENTS = ("start", "end", "none")
FAILURE_POLICIES = ("fail", "skip")

# Report reasons, in the order the summary lists them.
WRITTEN, RENAMED, DUPLICATE, TOO_SMALL, UNREADABLE, NEEDS_HEIF, IGNORED, RECODED = (
    "images written", "renamed (name taken)", "exact duplicates dropped", "below min_side dropped",
    "unreadable images dropped", "HEIC skipped (pip install pillow-heif)", "other files ignored",
    "captions not in UTF-8, converted")
EDITED, KEPT, GENERATED, REUSED, TEMPLATED, FAILED, UNCAPTIONED = (
    "captions edited in the prepared folder kept", "captions kept", "captions generated",
    "captions reused from an earlier run", "captions from the template", "captions failed (left without)",
    "images without a caption")


@user_facing
class PrepareError(ValueError):
    pass


@dataclass
class PrepareOptions:
    min_side: int = 256  # shorter side in pixels; 0 keeps every size
    max_side: int = 2048  # longer side is scaled down to this; 0 keeps the size
    background: str = "white"  # what transparent pixels become


@dataclass
class PreparedImage:
    name: str  # path inside the prepared set, e.g. "10_dog/a.png"
    source: str  # path inside the source
    pixel_hash: str
    source_caption: str | None
    file_hash: str = ""  # sha256 of the PNG written
    edited_caption: str | None = None  # the user's edit in the earlier prepared folder, kept as it is
    control: bool = False  # an edit pair's control image (captioned by its target)

    @property
    def caption_name(self) -> str:
        return os.path.splitext(self.name)[0] + ds.CAPTION_EXTENSION


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str | None = None) -> None:
        self.counts[reason] += 1
        if name is not None:
            self.names.setdefault(reason, []).append(name)

    def summary(self) -> str:
        lines = []
        for reason in (WRITTEN, RENAMED, DUPLICATE, TOO_SMALL, UNREADABLE, NEEDS_HEIF, IGNORED, RECODED,
                       EDITED, KEPT, GENERATED, REUSED, TEMPLATED, FAILED, UNCAPTIONED):
            if self.counts[reason]:
                shown = self.names.get(reason, [])[:5]
                more = "" if len(self.names.get(reason, [])) <= 5 else ", ..."
                lines.append(f"{reason}: {self.counts[reason]}" + (f" ({', '.join(shown)}{more})" if shown else ""))
        return "\n".join(lines)


def openable_extensions() -> tuple[str, ...]:
    """Every extension Pillow has an opener for, plus HEIC (read when pillow-heif is installed)."""
    Image.init()
    return tuple(sorted({ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
                        | set(HEIC_EXTENSIONS)))


def _heif_available() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def prepare_images(source: str, out_dir: str, options: PrepareOptions, report: Report,
                   check_cancel: Callable[[], None] = lambda: None,
                   on_image: Callable[[int], None] = lambda done: None) -> list[PreparedImage]:
    """Converts the images of `source` (folder or archive) into `out_dir` (created, must not exist)."""
    if options.background not in ds.BACKGROUNDS:
        raise PrepareError(f"background {options.background!r} is not one of {', '.join(ds.BACKGROUNDS)}")
    label = ds.dataset_label(source)
    extensions = openable_extensions()
    heif = None  # probed at the first HEIC file
    skipped: list[str] = []
    captions: dict[str, str] = {}
    prepared: list[PreparedImage] = []
    by_hash: dict[str, str] = {}
    taken: set[str] = set()
    os.makedirs(out_dir)
    for name, data in ds.iter_dataset_files(source, extensions, skipped=skipped):
        check_cancel()
        stem, ext = os.path.splitext(name)
        if ext.lower() == ds.CAPTION_EXTENSION:
            captions[stem], encoding = ds.decode_caption_any(label, name, data)
            if encoding != "UTF-8":  # written as UTF-8, which the trainer reads
                report.add(RECODED, f"{name} read as {encoding}")
            continue
        ds.repeat_count(label, name)  # a bad repeat folder is refused before any work is wasted
        if ext.lower() in HEIC_EXTENSIONS:
            heif = _heif_available() if heif is None else heif
            if not heif:
                report.add(NEEDS_HEIF, name)
                continue
        try:
            image = ds.normalize_image(ds.decode_image(label, name, data), options.background)
        except ds.DatasetError as e:
            report.add(UNREADABLE, name)
            log.warning("%s", e)
            continue
        control = ds.control_target(name) is not None
        if min(image.size) < options.min_side and not control:
            report.add(TOO_SMALL, f"{name} {image.width}x{image.height}")
            continue
        digest = pixel_hash(image)
        if not control:
            if digest in by_hash:
                report.add(DUPLICATE, f"{name} = {by_hash[digest]}")
                continue
            by_hash[digest] = name
        if options.max_side and max(image.size) > options.max_side:
            scale = options.max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        out_name = _free_name(stem, ext, taken)
        if out_name != stem + ".png":
            report.add(RENAMED, f"{name} -> {out_name}")
        path = os.path.join(out_dir, *out_name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=4)
        with open(path, "wb") as f:  # the folder is a private build folder until it is swapped in
            f.write(buffer.getvalue())
        prepared.append(PreparedImage(out_name, name, digest, None, hashlib.sha256(buffer.getvalue()).hexdigest(),
                                      control=control))
        report.add(WRITTEN)
        on_image(len(prepared))
    for image in prepared:
        image.source_caption = captions.get(os.path.splitext(image.source)[0])
    for name in skipped:
        report.add(IGNORED, name)
    if not prepared:
        raise PrepareError(f"dataset {label!r}: no usable image\n{report.summary()}")
    try:
        ds.pair_controls(label, [image.name for image in prepared])
    except ds.DatasetError as e:
        raise PrepareError(f"{e}; in the prepared set, after:\n{report.summary()}") from None
    return prepared


def _free_name(stem: str, ext: str, taken: set[str]) -> str:
    """`stem.png`; when another image of the run holds that name (`stem.jpg` and `stem.png`, or
    `IMG_1.jpg` and `IMG_1.JPG`), `stem_<ext>.png`, then `stem_<ext>_2.png`, … Names are compared
    without case, as Windows and macOS file systems do."""
    name = next(c for c in _name_candidates(stem, ext) if c.casefold() not in taken)
    taken.add(name.casefold())
    return name


def _name_candidates(stem: str, ext: str) -> Iterator[str]:
    yield stem + ".png"
    other = f"{stem}_{ext.lstrip('.').lower()}"
    yield other + ".png"
    for n in itertools.count(2):
        yield f"{other}_{n}.png"


# --- captions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionStyle:
    """How a caption this module writes is assembled from the captioner's text."""

    trigger_word: str = "TOK"
    placement: str = "start"  # start | end | none; never added twice
    prefix: str = ""
    suffix: str = ""

    def fill(self, text: str) -> str:
        return text.replace("{trigger}", self.trigger_word.strip())

    def apply(self, text: str) -> str:
        body = " ".join(p for p in (self.fill(self.prefix).strip(), text.strip(), self.fill(self.suffix).strip()) if p)
        trigger = self.trigger_word.strip()
        if not trigger or self.placement == "none" or ds.has_word(body, trigger):
            return body
        return f"{trigger}, {body}" if self.placement == "start" else f"{body}, {trigger}"


class CaptionCache:
    """Endpoint replies already paid for, appended one JSON line per caption as it arrives."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, str] = {}
        self._lock = threading.Lock()
        for entry in _read_lines(path):
            try:
                self.entries[entry["key"]] = entry["text"]
            except (KeyError, TypeError):
                continue  # a line cut by a crash: that caption is asked for again

    @staticmethod
    def key(image: PreparedImage, settings_key: str) -> str:
        return hashlib.sha256(f"{image.pixel_hash}\n{settings_key}".encode()).hexdigest()

    def add(self, key: str, text: str) -> None:
        with self._lock:
            self.entries[key] = text
            _append_line(self.path, {"key": key, "text": text})


def _append_line(path: str, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_lines(path: str) -> list[dict]:
    entries = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    return entries


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_captions(out_dir: str, images: list[PreparedImage], *, mode: str, style: CaptionStyle,
                   report: Report, template: str | None = None,
                   captioner: Callable[[PreparedImage, str], str] | None = None, settings_key: str = "",
                   concurrency: int = 1, on_failure: str = "fail",
                   check_cancel: Callable[[], None] = lambda: None,
                   abort: Callable[[], None] = lambda: None,
                   on_caption: Callable[[int, int], None] = lambda done, total: None) -> None:
    """Writes `<image>.txt` beside each prepared image.

    keep: the source's captions only; fill: the source's, else a new one; overwrite: new ones for
    all. New ones come from `template` or from `captioner(image, path)` (its text is cached).
    Failures of single images follow `on_failure` (fail | skip); a failure of the endpoint itself
    (exception attribute `fatal`) always stops the run. `check_cancel` is polled every 0.2 s and
    raises to cancel; when the run stops early `abort` is called so that captioner calls in
    progress end, and it returns without waiting for them.
    """
    if mode not in CAPTION_MODES:
        raise PrepareError(f"caption_mode {mode!r} is not one of {', '.join(CAPTION_MODES)}")
    if on_failure not in FAILURE_POLICIES:
        raise PrepareError(f"on_caption_error {on_failure!r} is not one of {', '.join(FAILURE_POLICIES)}")
    if style.placement not in TRIGGER_PLACEMENTS:
        raise PrepareError(f"trigger_placement {style.placement!r} is not one of {', '.join(TRIGGER_PLACEMENTS)}")
    cache = CaptionCache(os.path.join(out_dir, CAPTION_CACHE_FILE))
    to_ask: list[PreparedImage] = []

    record = os.path.join(out_dir, CAPTION_RECORD_FILE)

    def write(image: PreparedImage, text: str) -> None:
        path = os.path.join(out_dir, *image.caption_name.split("/"))
        write_text_atomic(path, text)
        _append_line(record, {"name": image.caption_name, "sha256": _file_hash(path)})

    for image in images:
        if image.control:
            continue  # an edit pair's instruction is its target's caption
        if image.edited_caption is not None:
            report.add(EDITED, image.caption_name)  # already in place: build_prepared_set carried it
        elif image.source_caption is not None and mode in ("keep", "fill"):
            write(image, image.source_caption)
            report.add(KEPT)
        elif mode == "keep":
            report.add(UNCAPTIONED, image.name)
        elif template is not None:
            write(image, style.apply(style.fill(template)))
            report.add(TEMPLATED)
        elif (cached := cache.entries.get(cache.key(image, settings_key))) is not None:
            write(image, style.apply(cached))
            report.add(REUSED)
        else:
            to_ask.append(image)
    if not to_ask:
        return
    if captioner is None:
        raise PrepareError("captions are needed but neither a template nor a captioner was given")

    stop = threading.Event()

    def ask(image: PreparedImage) -> str:
        if stop.is_set():
            raise InterruptedError
        return captioner(image, os.path.join(out_dir, *image.name.split("/")))

    done = 0
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="fluxq-caption")
    # not `with`: its exit waits for the workers, and a cancelled run must not wait for a slow reply
    try:
        pending: dict[Future, PreparedImage] = {pool.submit(ask, image): image for image in to_ask}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                check_cancel()
                for future in finished:
                    image = pending.pop(future)
                    try:
                        text = future.result()
                    except Exception as e:
                        if getattr(e, "fatal", False) or on_failure == "fail":
                            raise
                        report.add(FAILED, image.name)
                        log.warning("caption of %s skipped: %s", image.name, e)
                    else:
                        cache.add(cache.key(image, settings_key), text)
                        write(image, style.apply(text))
                        report.add(GENERATED)
                    done += 1
                    on_caption(done, len(to_ask))
        except BaseException:
            stop.set()
            abort()
            raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def build_prepared_set(source: str, out_dir: str, options: PrepareOptions, report: Report,
                       check_cancel: Callable[[], None] = lambda: None,
                       on_image: Callable[[int], None] = lambda done: None) -> list[PreparedImage]:
    """prepare_images into a hidden sibling folder, then swapped in for `out_dir`: a failed or
    cancelled run leaves the previous set whole. Its caption cache and the captions the user
    edited in it are carried over; anything else the user changed there stops the run first."""
    parent, name = os.path.split(out_dir)
    # relative to the input folder: a folder and an archive of the same name are different sources
    source_name = os.path.relpath(source, parent).replace(os.sep, "/")
    edits = _earlier_edits(out_dir, source_name) if os.path.exists(out_dir) else {}
    build_dir = os.path.join(parent, f".{name}.fluxq-build")
    shutil.rmtree(build_dir, ignore_errors=True)
    try:
        images = prepare_images(source, build_dir, options, report, check_cancel, on_image)
        by_pixels = {image.pixel_hash: image for image in images if not image.control}
        lost = sorted(caption for pixels, (caption, _) in edits.items() if pixels not in by_pixels)
        if lost:
            raise PrepareError(
                f"{name!r}: caption(s) edited there belong to images that this run no longer writes (removed "
                f"from the source, changed, or dropped): {_listed(lost)}. Move those captions out of {name!r} "
                "(or delete them), or choose another output_name")
        for pixels, (_, text) in edits.items():
            image = by_pixels[pixels]
            image.edited_caption = text
            write_text_atomic(os.path.join(build_dir, *image.caption_name.split("/")), text)
        old_cache = os.path.join(out_dir, CAPTION_CACHE_FILE)
        if os.path.isfile(old_cache):
            shutil.copyfile(old_cache, os.path.join(build_dir, CAPTION_CACHE_FILE))
        with open(os.path.join(build_dir, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump({"source": source_name, "min_side": options.min_side, "max_side": options.max_side,
                       "background": options.background,
                       "images": {i.name: {"pixels": i.pixel_hash, "sha256": i.file_hash, "control": i.control}
                                  for i in images}}, f)
        _replace_folder(build_dir, out_dir)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return images


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _earlier_edits(out_dir: str, source_name: str) -> dict[str, tuple[str, str]]:
    """Captions the user edited or added in an earlier prepared set, as {pixel hash of their image:
    (caption name, text)}. Refuses a folder this module did not write, one prepared from another
    source, and one holding any other change a rebuild would lose."""
    name = os.path.basename(out_dir)
    try:
        with open(os.path.join(out_dir, MARKER_FILE), encoding="utf-8") as f:
            marker = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise PrepareError(f"{name!r} already exists and was not written by FluxQPrepareDataset: choose another "
                           "output_name") from None
    except ValueError as e:
        raise PrepareError(f"{name!r}: its {MARKER_FILE} is damaged ({e}); move the folder away or choose another "
                           "output_name") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("images"), dict):
        raise PrepareError(f"{name!r} was prepared by an earlier version of FluxQPrepareDataset, which did not "
                           "record what it wrote, so captions edited there cannot be told apart: move the folder "
                           "away (or delete it), or choose another output_name")
    if marker.get("source") != source_name:
        raise PrepareError(f"{name!r} was prepared from {marker.get('source')!r}, not from {source_name!r} (a folder "
                           "and an archive of the same name both default to it): choose another output_name")
    images: dict[str, dict] = marker["images"]
    written = {e.get("name"): e.get("sha256") for e in _read_lines(os.path.join(out_dir, CAPTION_RECORD_FILE))
               if isinstance(e, dict)}
    edits: dict[str, tuple[str, str]] = {}
    changed: list[str] = []
    seen: set[str] = set()
    for root, folders, files in os.walk(out_dir):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        for file in sorted(files):
            if file.startswith("."):
                continue  # ours (marker, cache, record) or the system's (.DS_Store)
            rel = os.path.relpath(os.path.join(root, file), out_dir).replace(os.sep, "/")
            path = os.path.join(root, file)
            seen.add(rel)
            stem, ext = os.path.splitext(rel)
            if rel in images:
                if _file_hash(path) != images[rel].get("sha256"):
                    changed.append(f"{rel} (changed since it was prepared)")
            elif ext.lower() == ds.CAPTION_EXTENSION and written.get(rel) == _file_hash(path):
                continue  # a caption as this module wrote it
            elif (ext.lower() == ds.CAPTION_EXTENSION and stem + ".png" in images
                  and not images[stem + ".png"].get("control")):  # a control's caption would never be read
                with open(path, "rb") as f:
                    text, _ = ds.decode_caption_any(name, rel, f.read())
                edits[images[stem + ".png"]["pixels"]] = (rel, text)
            else:
                changed.append(f"{rel} (not written by FluxQPrepareDataset)")
    changed += [f"{rel} (deleted since it was prepared)" for rel in sorted(set(images) - seen)]
    if changed:
        raise PrepareError(
            f"{name!r} holds changes a rerun would lose: {_listed(changed)}. Move them out (an edited or new image "
            f"belongs in the source, in place of its original), or choose another output_name; nothing was changed")
    return edits


def _replace_folder(build_dir: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        parent, name = os.path.split(out_dir)
        old = os.path.join(parent, f".{name}.fluxq-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(build_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build_dir, out_dir)


def checked_folder_name(name: str) -> str:
    name = name.strip()
    if not name or name.startswith(".") or re.search(r"[/\\:\x00]", name):
        raise PrepareError(f"output_name {name!r} must be a plain folder name (no folders, not starting with '.')")
    return name
