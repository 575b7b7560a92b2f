"""FluxQPrepareDataset: a folder or archive of mixed photos under input/ becomes a clean,
captioned training set in a new folder under input/ (the work is in lora_ops.prepare and
lora_ops.captioning)."""

from __future__ import annotations

import hashlib
import logging
import os

import folder_paths
from comfy_api.latest import io, ui
from PIL import Image

from ..lora_ops import captioning as cap
from ..lora_ops import dataset as ds
from ..lora_ops import prepare as prep
from .comfy_glue import progress_bar, raise_if_cancelled, show_progress_text
from .training import NONE, dataset_options

CATEGORY = "Flux QLoRA Lab/training"
CAPTIONERS = ("template", "openai-compatible")
PREPARED_SUFFIX = "_prepared"

log = logging.getLogger("fluxq")


def input_path(name: str, input_name: str) -> str:
    """`name` under ComfyUI's input folder, refused if it points anywhere else."""
    input_dir = os.path.abspath(folder_paths.get_input_directory())
    path = os.path.abspath(os.path.join(input_dir, name))
    if not name or os.path.commonpath([input_dir, path]) != input_dir or path == input_dir:
        raise ValueError(f"{input_name} {name!r} is not a folder or archive inside the input folder")
    return path


def output_folder_name(source: str, output_name: str) -> str:
    if output_name.strip():
        return prep.checked_folder_name(output_name)
    stem = os.path.basename(source.rstrip("/"))
    for ext in ds.ARCHIVE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return prep.checked_folder_name(stem + PREPARED_SUFFIX)


class FluxQPrepareDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQPrepareDataset",
            display_name="Prepare Training Images (FluxQ)",
            category=CATEGORY,
            description="Turns a folder or .zip/.tar of mixed photos under input/ into a clean training set in a new "
                        "folder under input/: RGB PNGs the right way up, duplicates and tiny images dropped (and "
                        "reported), captions kept, templated or written by a vision model. The originals are only "
                        "read. Outputs the folder name for FluxQTrainLoRA's dataset_name.",
            is_output_node=True,  # runs on its own too: preparing and captioning is a job in itself
            inputs=[
                io.Combo.Input("source", options=[o for o in dataset_options() if o != NONE],
                               tooltip="A folder under input/ (or a .zip/.tar there). Any image Pillow opens (JPEG, "
                                       "PNG, WEBP, BMP, TIFF, GIF first frame; HEIC with pillow-heif) and same-name "
                                       ".txt captions. kohya repeat folders (10_name/) keep their weight."),
                io.String.Input("output_name", default="",
                                tooltip="Folder to write under input/ (empty: <source>_prepared). Rerunning rebuilds "
                                        "a folder this node wrote from the same source and keeps the captions you "
                                        "edited there; a folder it did not write, one from another source (photos/ "
                                        "and photos.zip) or one with images edited, added or deleted is refused."),
                io.Int.Input("min_side", default=256, min=0, max=8192,
                             tooltip="Images whose shorter side is below this are dropped and reported (0 keeps "
                                     "all). 256 px is half the trainer's default 512 resolution."),
                io.Int.Input("max_side", default=2048, min=0, max=16384,
                             tooltip="Longer side scaled down to this (0 keeps the size). 2048 leaves room for "
                                     "training at 1024 while keeping phone photos small."),
                io.Combo.Input("background", options=list(ds.BACKGROUNDS), default="white",
                               tooltip="What transparent pixels (PNG/WEBP/GIF alpha) become."),
                io.Combo.Input("caption_mode", options=list(prep.CAPTION_MODES), default="keep",
                               tooltip="keep: copy the source's same-name .txt captions, caption nothing new. fill: "
                                       "keep those and caption only images without one. overwrite: caption every "
                                       "image anew."),
                io.Combo.Input("captioner", options=list(CAPTIONERS), default="template",
                               tooltip="template: the fixed text below, no network. openai-compatible: a vision "
                                       "model behind endpoint_url (OpenAI, or a local Ollama / LM Studio / vLLM / "
                                       "llama.cpp server)."),
                io.String.Input("trigger_word", default="TOK",
                                tooltip="Replaces {trigger} in template, prefix and suffix, and is placed by "
                                        "trigger_placement into the captions this node writes. A new caption "
                                        "that already holds it as a word (from the template, prefix, suffix or "
                                        "the model) is left as it is, never given it twice; kept captions are "
                                        "copied unchanged (the trainer puts its trigger word first in a caption "
                                        "without it)."),
                io.Combo.Input("trigger_placement", options=list(prep.TRIGGER_PLACEMENTS), default="start",
                               tooltip="Where the trigger word goes in new captions when they do not hold it yet: "
                                       "start ('TOK, ...'), end ('..., TOK') or none."),
                io.String.Input("caption_prefix", default="", tooltip="Put before every new caption ({trigger} allowed)."),
                io.String.Input("caption_suffix", default="", tooltip="Put after every new caption ({trigger} allowed)."),
                io.String.Input("template", default="a photo of {trigger}",
                                tooltip="captioner=template: the caption of every image that needs one."),
                io.String.Input("endpoint_url", default=cap.DEFAULT_BASE_URL,
                                tooltip="Base URL of an OpenAI-compatible API (…/v1); /chat/completions is added. "
                                        "Ollama: http://localhost:11434/v1, LM Studio: http://localhost:1234/v1, "
                                        "vLLM: http://localhost:8000/v1, llama.cpp server: http://localhost:8080/v1. "
                                        "Images go only to localhost, known API providers and the hosts listed in "
                                        f"the {cap.HOSTS_VARIABLE} environment variable (a workflow cannot add one)."),
                io.String.Input("model", default=cap.DEFAULT_MODEL,
                                tooltip="A vision model the endpoint serves (e.g. gpt-4o-mini; qwen2.5vl or llava on "
                                        "Ollama)."),
                io.String.Input("api_key_env", default=cap.DEFAULT_KEY_VARIABLE,
                                tooltip="Name of the environment variable holding the API key (it must end in "
                                        "API_KEY). The key itself is never stored in the workflow, logs or files, "
                                        "and goes only to its provider's host (OPENAI_API_KEY: api.openai.com) or "
                                        f"the hosts in {cap.HOSTS_VARIABLE}. Unset or empty: no key is sent "
                                        "(local servers)."),
                io.String.Input("instruction", default=cap.DEFAULT_INSTRUCTION, multiline=True,
                                tooltip="What the vision model is asked. The default asks for one or two "
                                        "natural-language sentences, which suits FLUX's T5 better than tag lists."),
                io.Float.Input("temperature", default=0.2, min=0.0, max=2.0, step=0.05,
                               tooltip="Low keeps captions factual and repeatable."),
                io.Int.Input("max_tokens", default=120, min=8, max=4096,
                             tooltip="Longest reply; two sentences need about 60-80."),
                io.Int.Input("concurrency", default=4, min=1, max=32,
                             tooltip="Images captioned at the same time. Lower it for a local server on one GPU."),
                io.Float.Input("timeout", default=60.0, min=1.0, max=600.0, step=1.0,
                               tooltip="Seconds for one whole reply. 429, 5xx and timeouts are retried "
                                       f"{cap.MAX_RETRIES} times, pausing as Retry-After says or 1, 2, 4… s, "
                                       "each pause at most this long (a longer Retry-After fails the image at "
                                       f"once): one image takes at most {2 * cap.MAX_RETRIES + 1} x timeout. "
                                       "Cancel stops at once."),
                io.Combo.Input("on_caption_error", options=list(prep.FAILURE_POLICIES), default="fail",
                               tooltip="fail: stop at the first image the endpoint cannot caption. skip: leave it "
                                       "without a caption and report it (fill mode retries it later). An endpoint "
                                       "that cannot be reached or refuses the key always stops the run."),
            ],
            outputs=[
                io.String.Output(display_name="dataset_name",
                                 tooltip="The prepared folder under input/, for FluxQTrainLoRA's dataset_name."),
                io.String.Output(display_name="report", tooltip="Counts per reason: written, dropped, captioned."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, source, output_name, **_) -> str:
        """Reruns when the source changes or the prepared folder went away, not on every queue
        (a rerun would also retrain a connected trainer)."""
        digest = hashlib.sha256()
        try:
            path = input_path(source, "source")
            out = input_path(output_folder_name(source, output_name), "output_name")
        except ValueError as e:
            return str(e)
        for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
            for name in sorted(files):
                try:
                    stat = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                digest.update(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        digest.update(str(os.path.isfile(os.path.join(out, prep.MARKER_FILE))).encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, source, output_name, min_side, max_side, background, caption_mode, captioner, trigger_word,
                trigger_placement, caption_prefix, caption_suffix, template, endpoint_url, model, api_key_env,
                instruction, temperature, max_tokens, concurrency, timeout, on_caption_error) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        if captioner not in CAPTIONERS:
            raise ValueError(f"captioner {captioner!r} is not one of {', '.join(CAPTIONERS)}")
        source_path = input_path(source, "source")
        name = output_folder_name(source, output_name)
        out_dir = input_path(name, "output_name")
        if os.path.commonpath([out_dir, source_path]) in (out_dir, source_path):
            raise ValueError(f"output_name {name!r} would hold or be inside the source {source!r}; the originals "
                             "are never overwritten")
        vision = None
        if captioner == "openai-compatible" and caption_mode != "keep":
            # Checked before any work: a bad URL or key variable fails at once.
            vision = cap.VisionCaptioner(cap.EndpointSettings(endpoint_url, model, instruction, temperature,
                                                              max_tokens, timeout), api_key_env)

        report = prep.Report()
        check_cancel = raise_if_cancelled
        images = prep.build_prepared_set(
            source_path, out_dir, prep.PrepareOptions(min_side, max_side, background), report, check_cancel,
            on_image=lambda done: show_progress_text(f"converted {done} image(s)", node_id))

        progress = progress_bar(len(images), node_id)

        def on_caption(done: int, total: int) -> None:
            progress.update_absolute(done, total)
            show_progress_text(f"captioned {done}/{total}", node_id)

        def ask(image: prep.PreparedImage, path: str) -> str:
            with Image.open(path) as picture:
                return vision.caption(picture)

        prep.write_captions(
            out_dir, images, mode=caption_mode,
            style=prep.CaptionStyle(trigger_word, trigger_placement, caption_prefix, caption_suffix),
            report=report, template=template if captioner == "template" else None,
            captioner=ask if vision is not None else None,
            settings_key=vision.settings.cache_key() if vision is not None else "",
            concurrency=concurrency, on_failure=on_caption_error, check_cancel=check_cancel,
            # cancel cuts off requests in flight and Retry-After waits at once
            abort=vision.abort if vision is not None else lambda: None,
            on_caption=on_caption)
        summary = f"{name}\n{report.summary()}"
        log.info("FluxQPrepareDataset: %s -> %s", source, summary.replace("\n", "; "))
        show_progress_text(summary, node_id)
        return io.NodeOutput(name, summary, ui=ui.PreviewText(summary))


NODES = [FluxQPrepareDataset]
