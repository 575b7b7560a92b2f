"""The training run behind FluxQTrainLoRA and scripts/fluxq_train.py: one code path for both.

The math and the loop live in lora_ops (flow_match, dataset, lora_checkpoint, distributed); this
module wires them to ComfyUI (VAE/CLIP encoding, device placement, progress, cancel, model
folders), reaching ComfyUI's internals only through comfy_glue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid

import folder_paths
import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image

from ..lora_ops import dataset as ds
from ..lora_ops import flow_match as fm
from ..lora_ops import flux_family
from ..lora_ops import lora_checkpoint as ckpt
from ..lora_ops.atomic import atomic_path
from ..lora_ops.distributed import World
from ..lora_ops.ema import WeightEMA
from ..lora_ops.latent_cache import LatentCache, model_fingerprint
from ..lora_ops.lora_runtime import LoraEntry, LowRankAdapter, activate, install_hooks
from . import comfy_glue as glue
from . import sampling

NONE = "[none]"
RAW = "raw/"  # train-state tensor names of the raw factors, kept when the LoRA file holds their EMA
# kohya's FLUX targets: every linear layer inside the transformer blocks.
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")

log = logging.getLogger("fluxq")


def dataset_options() -> list[str]:
    input_dir = folder_paths.get_input_directory()
    archives = [f for f in os.listdir(input_dir) if ds.is_archive(f)] if os.path.isdir(input_dir) else []
    return [NONE, *sorted(folder_paths.get_input_subfolders()), *sorted(archives)]


def train_lora(model, vae, clip, settings: dict, images=None, captions=None, node_id=None, world: World = World(),
               dataset_name=None, sample_settings=None, stop_requested=None):
    """Trains with the node's settings (its widget inputs by name); returns the model with the
    LoRA applied, the saved file name, the loss per step and the sample images saved (ComfyUI UI
    image entries). `dataset_name` (a dataset name from another node) overrides
    settings["dataset"]; `sample_settings` (FLUX_SAMPLER_SETTINGS) sets the samples' and
    generated class images' steps and guidance; `stop_requested()` (the script's signals) stops
    the run between steps as ComfyUI's cancel does. A cancel raises glue.TrainingCancelled once
    the last finished step is saved."""
    settings = dict(settings)
    dataset = settings.pop("dataset")
    samples = collect_samples(dataset_name or dataset, images, captions)
    run = TrainingRun(model, samples, node_id=node_id, world=world, sample_settings=sample_settings,
                      stop_requested=stop_requested, **settings)
    return run.train(vae, clip)


def cache_directory() -> str:
    """Where latents, embeddings and generated class images are kept between runs: a folder in
    ComfyUI's user directory (temp/ is emptied when ComfyUI starts)."""
    return os.path.join(folder_paths.get_user_directory(), "fluxq_cache")


def checked_lora_name(name: str) -> str:
    name = name.strip()
    if name.lower().endswith(ckpt.LORA_EXTENSION):
        name = name[: -len(ckpt.LORA_EXTENSION)]
    if not name or name.startswith(".") or re.search(r"[/\\:\x00]", name):
        raise ValueError(f"lora_name {name!r} must be a plain file name (no folders, not starting with '.')")
    return name


def collect_samples(dataset: str, images, captions) -> list[ds.Sample]:
    """From the `dataset` folder/archive, or from `images` (+ `captions`) given by core nodes."""
    if dataset != NONE and images:
        raise ValueError("give either `dataset` or `images`, not both")
    if dataset != NONE:
        return read_input_dataset(dataset, "dataset")
    if not images:
        raise ValueError("no training images: choose a `dataset` or connect `images`")
    frames = [frame for batch in images for frame in batch]
    texts = list(captions or [])
    if texts and len(texts) != len(frames):
        raise ValueError(f"{len(texts)} captions for {len(frames)} images")
    return [
        ds.Sample(f"images[{i}]", image_from_batch(frame[None]), texts[i] if texts else None)
        for i, frame in enumerate(frames)
    ]


def read_input_dataset(name: str, input_name: str) -> list[ds.Sample]:
    """A dataset folder or archive under input/, read with the dataset rules (no escapes, budgets);
    an error names the input it came from (`dataset` or `class_images`)."""
    path = os.path.join(folder_paths.get_input_directory(), name)
    input_dir = os.path.abspath(folder_paths.get_input_directory())
    if os.path.commonpath([input_dir, os.path.abspath(path)]) != input_dir:
        raise ValueError(f"{input_name} {name!r} is outside the input folder")
    if not os.path.exists(path):
        raise ds.DatasetError(f"{input_name} {name!r}: no such folder or archive in {input_dir}")
    try:
        return ds.read_dataset(path)
    except ds.DatasetError as e:
        if str(e).startswith(f"{input_name} "):  # already says "dataset '<name>' ..."
            raise
        raise ds.DatasetError(f"{input_name}: {e}") from None


def name_clash_message(name: str, folder: str, files: list[str]) -> str:
    """Why a new run under `name` is refused: an earlier training run's checkpoints (which
    `resume` can continue), or LoRA files with no train-state (anyone's, not resumable)."""
    runs = [p for p in files if ckpt.run_id_of(p) and os.path.isfile(ckpt.state_path_for(p))]
    plain = [p for p in files if p not in runs]
    listed = ", ".join
    parts = []
    if runs:
        parts.append(f"{listed(os.path.basename(p) for p in runs)} in {folder} belong to an earlier training run "
                     "(continue it with `resume`)")
    if plain:
        parts.append(f"{listed(os.path.basename(p) for p in plain)} already exist(s) in {folder} (a LoRA file "
                     f"without a {ckpt.STATE_EXTENSION}: not a training run that can be continued)")
    return (f"lora_name {name!r}: {'; '.join(parts)}. Pick another lora_name, or turn on `replace_existing` to "
            "delete them (and the earlier samples) once this run has saved a checkpoint of its own.")


def samples_subfolder(name: str) -> str:
    return f"{name}_samples"


def existing_sample_images(name: str) -> list[str]:
    """The sample images of runs under `name` in output/<name>_samples."""
    folder = os.path.join(folder_paths.get_output_directory(), samples_subfolder(name))
    pattern = re.compile(rf"{re.escape(name)}_step\d{{6,}}_\d+\.png")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if pattern.fullmatch(f)) \
        if os.path.isdir(folder) else []


def parse_sample_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def image_from_batch(images: torch.Tensor, index: int = 0) -> Image.Image:
    """One image of a ComfyUI IMAGE batch (B, H, W, 3 in 0..1) as 8-bit RGB."""
    return Image.fromarray((images[index].float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8))


def save_png(image: Image.Image, path: str) -> None:
    """Written to a temporary file, then renamed: no half-written image is ever read back."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def trainable_layers(diffusion_model: torch.nn.Module, layer_regex: str, rank: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each block linear the LoRA trains."""
    try:
        pattern = re.compile(layer_regex) if layer_regex.strip() else None
    except re.error as e:
        raise ValueError(f"layer_regex {layer_regex!r} is not a valid regular expression: {e}") from None
    layers = {}
    for path, module in diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.startswith(BLOCK_PREFIXES):
            if pattern is None or pattern.search(path):
                layers[path] = (module.in_features, module.out_features)
    if not layers:
        raise ValueError(f"layer_regex {layer_regex!r} matches no linear layer of the transformer blocks")
    too_small = [f"{p} ({i}->{o})" for p, (i, o) in layers.items() if rank > min(i, o)]
    if too_small:
        raise ValueError(f"rank {rank} is larger than layer(s) {', '.join(too_small[:3])}")
    return layers


def make_autograd_safe(module: torch.nn.Module) -> None:
    """ComfyUI runs nodes under inference_mode, so weights it loaded are inference tensors, which
    autograd may not save for backward (needed to reach the LoRAs of earlier layers). Swap the float
    ones for ordinary copies, once; quantized bytes are only dequantized, never saved, so they stay."""
    with torch.inference_mode(False):
        for name, param in list(module.named_parameters()):
            if param.is_inference() and param.is_floating_point():
                glue.set_module_tensor(module, name, param.detach().clone(), parameter=True)
        for name, buffer in list(module.named_buffers()):
            if buffer.is_inference():
                glue.set_module_tensor(module, name, buffer.clone(), parameter=False)


@contextlib.contextmanager
def norm_inputs_copied(diffusion_model: torch.nn.Module):
    """ComfyUI's FLUX blocks add the residual in place (`x += ...`) after a LayerNorm saved `x` for
    backward, which autograd refuses. While training, each LayerNorm gets its own copy of its
    input, so the saved tensor is never the one modified."""

    def copy_input(module, args):
        if torch.is_grad_enabled() and args[0].requires_grad:
            return (args[0].clone(), *args[1:])
        return None

    handles = [m.register_forward_pre_hook(copy_input) for m in diffusion_model.modules()
               if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TrainingRun:
    """One press of the node (or one training script run): checks everything that can be checked
    before any heavy work. In a `world` of several ranks every rank runs one; only rank 0 writes."""

    def __init__(self, model, samples: list[ds.Sample], *, node_id, world: World = World(), trigger_word, rank, alpha,
                 learning_rate, steps, batch_size, gradient_accumulation, resolution, seed, optimizer,
                 lr_schedule, warmup_steps, caption_dropout, timestep_sampling, gradient_checkpointing,
                 layer_regex, save_every, keep_last, lora_name, resume, replace_existing=False, ema_decay=0.0,
                 lora_dropout=0.0, cache_latents_to_disk=False, sample_every=0, sample_prompts="", sample_seed=0,
                 sample_settings=None, class_prompt="", class_images=NONE, class_image_count=0,
                 prior_loss_weight=1.0, stop_requested=None):
        self.model, self.samples, self.node_id, self.world = model, samples, node_id, world
        # What the family needs (guidance, timestep shift, sample preset) comes from the registry.
        self.detection = glue.model_family(model)
        self.member = self.detection.member
        if self.member.train_refusal:
            raise ValueError(f"cannot train {self.detection.label}: {self.member.train_refusal}")
        self.stop_requested = stop_requested or (lambda: False)
        self.name = checked_lora_name(lora_name)
        # The final file's name is also the LoRA's name on the returned model, as FluxQApplyLoRA
        # names it: remove, re-apply and the grid then treat it as that file.
        self.file_name = self.name + ckpt.LORA_EXTENSION
        self.folder = folder_paths.get_folder_paths("loras")[0]
        self.trigger_word, self.resolution = trigger_word, resolution
        self.buckets = ds.bucket_sizes(resolution)
        self.rank, self.alpha = rank, alpha
        self.gradient_checkpointing = gradient_checkpointing
        self.save_every, self.keep_last = save_every, keep_last
        self.settings = fm.TrainSettings(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size,
            gradient_accumulation=gradient_accumulation, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, timestep_sampling=timestep_sampling, caption_dropout=caption_dropout,
            seed=seed, prior_loss_weight=prior_loss_weight, shift_schedule=self.member.train_shift,
        )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay {ema_decay} must be 0 (off) or below 1 (0.99-0.999 is usual)")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout {lora_dropout} must be in [0, 1)")
        self.ema_decay, self.lora_dropout, self.cache_latents_to_disk = ema_decay, lora_dropout, cache_latents_to_disk
        self.sample_every, self.sample_seed = sample_every, sample_seed
        self.sample_prompts = parse_sample_prompts(sample_prompts)
        if sample_every and not self.sample_prompts:
            raise ValueError(f"sample_every is {sample_every} but sample_prompts is empty: give one prompt per line")
        self.render_settings = self._render_settings(sample_settings)
        for message in flux_family.training_messages(self.detection, sample_settings and sample_settings.preset):
            log.warning("FluxQTrainLoRA: %s", message)
            glue.show_progress_text(message, node_id)
        self.class_prompt, self.class_image_count = class_prompt.strip(), class_image_count
        self.class_samples = self._class_samples(class_images, class_image_count)
        self.diffusion_model = model.model.diffusion_model
        self.layers = trainable_layers(self.diffusion_model, layer_regex, rank)
        self.state_info = {"optimizer": optimizer, "rank": rank, "alpha": alpha, "seed": seed,
                           "layer_regex": layer_regex, "resolution": resolution}
        self.resumed_factors, self.resumed_ema, self.state, resumed_run, resume_path = self._load_resume(resume)
        # Checkpoints are pruned by run, not by name; a resumed run goes on under its own id.
        # (Only rank 0 writes, so the other ranks' ids never reach a file.)
        self.run_id = resumed_run or uuid.uuid4().hex
        self.state_info["run_id"] = self.run_id
        self.resume_name = None if resume == NONE else resume
        self.first_step = self.state.step if self.state else 0
        self.replaced = [path for path in ckpt.other_runs_files(self.folder, self.name, self.run_id)
                         if os.path.abspath(path) != resume_path]
        if self.replaced and not replace_existing:
            raise ValueError(name_clash_message(self.name, self.folder, self.replaced))
        # replace_existing clears an earlier run's samples too; a resumed run keeps its own
        self.old_samples = existing_sample_images(self.name) if replace_existing and resume == NONE else []
        self._warn_if_no_sample_step()

    def _warn_if_no_sample_step(self) -> None:
        if not self.sample_every:
            return
        first_sample = (self.first_step // self.sample_every + 1) * self.sample_every
        if first_sample > self.settings.steps:
            text = (f"sample_every {self.sample_every} is larger than the steps this run trains "
                    f"({self.first_step + 1}..{self.settings.steps}): no sample will be rendered")
            log.warning("FluxQTrainLoRA: %s", text)
            glue.show_progress_text(text, self.node_id)

    def _render_settings(self, given) -> sampling.FluxSamplerSettings:
        """The connected settings' steps, guidance, sampler and shift at the training resolution
        (samples and class images are made square at `resolution`); without settings, the
        family member's training preset (flux-dev, flux-schnell, flux2-dev, flux2-klein-base, chroma)."""
        size = max(16, self.resolution - self.resolution % 16)
        if given is None:
            preset = self.member.train_preset
            given = sampling.FluxSamplerSettings(**{"shift": 1.0, **sampling.PRESETS[preset]}, preset=preset,
                                                 width=size, height=size, denoise=1.0)
        return dataclasses.replace(given, width=size, height=size, denoise=1.0)

    def _class_samples(self, class_images: str, class_image_count: int) -> list[ds.Sample]:
        """Prior preservation's class images from input/ (captioned with class_prompt); an empty
        list when they are to be generated at the start, or when prior preservation is off."""
        if not self.class_prompt:
            if class_images != NONE:
                raise ValueError(f"class_images {class_images!r} needs a class_prompt (e.g. 'a photo of a dog')")
            return []
        if class_images != NONE:
            return [ds.Sample(s.name, s.image, self.class_prompt, s.repeats)
                    for s in read_input_dataset(class_images, "class_images")]
        if class_image_count < 1:
            raise ValueError(f"class_prompt {self.class_prompt!r} needs class images: choose a class_images folder "
                             "or set class_image_count to generate them")
        return []

    def _load_resume(self, resume: str):
        """(factors, EMA factors, state, run id, path) of the checkpoint to continue; Nones for a
        new run. A run saved with EMA has the average in its LoRA file and the raw factors in its
        train-state."""
        if resume == NONE:
            return None, None, None, None, None
        path = os.path.abspath(folder_paths.get_full_path_or_raise("loras", resume))
        state, info = ckpt.load_train_state(path)
        factors, alpha, _ = ckpt.load_checkpoint(path, self.diffusion_model_paths())
        for key in ("optimizer", "rank", "alpha", "layer_regex"):
            if info.get(key) != self.state_info[key]:
                raise ValueError(f"cannot resume {resume}: it was trained with {key}={info.get(key)!r}, "
                                 f"this run asks for {self.state_info[key]!r}")
        if set(factors) != set(self.layers):
            raise ValueError(f"cannot resume {resume}: its layers differ from this model's selection")
        if state.step >= self.settings.steps:
            raise ValueError(f"{resume} has already trained {state.step} steps; raise `steps` to continue")
        ema = None
        if state.tensors:
            ema = factors
            try:
                factors = {p: ckpt.LoraFactors(state.tensors[f"{RAW}{p}.down"], state.tensors[f"{RAW}{p}.up"])
                           for p in ema}
            except KeyError as e:
                raise ValueError(f"cannot resume {resume}: its train-state lacks the raw weights {e.args[0]}") from None
        return factors, ema, state, info.get("run_id"), path

    def diffusion_model_paths(self) -> list[str]:
        return [path for path, _ in self.diffusion_model.named_modules()]

    def train(self, vae, clip):
        self.vae = vae
        cache = self._latent_cache(vae, clip) if self.cache_latents_to_disk else None
        embed = self._embedder(clip, cache)
        examples, empty_cond = self._encode(vae, embed, cache)
        # renders with real CFG (klein base, Chroma) need a negative: the empty prompt
        self.negative_cond = embed("") if self.render_settings.cfg != 1.0 else None
        class_examples = self._encode_class_images(vae, embed, cache)
        self.sample_conds = [embed(prompt) for prompt in self.sample_prompts] if self.sample_every else []
        if cache is not None:
            log.info("FluxQTrainLoRA: latent cache in %s: %s", cache.folder, cache.counts)
        device = glue.load_for_training(self.model)
        make_autograd_safe(self.diffusion_model)
        self.diffusion_model.requires_grad_(False)
        with torch.inference_mode(False), norm_inputs_copied(self.diffusion_model), glue.training_mode():
            # Copies made outside inference mode (tensors read under ComfyUI's inference_mode cannot
            # be saved for backward), kept on the CPU: the trainer moves each micro-batch to the
            # device, so the data set's latents and embeddings do not sit beside the model.
            def trainable(e: fm.TrainingExample) -> fm.TrainingExample:
                reference = None if e.reference is None else e.reference.clone()
                return fm.TrainingExample(e.latent.clone(), self._cond_copy(e.cond), reference)

            examples = [trainable(e) for e in examples]
            # kohya repeats: an image of a `10_name/` folder is listed ten times (the same tensors),
            # so the trainer draws it ten times as often.
            examples = [e for e, sample in zip(examples, self.samples) for _ in range(sample.repeats)]
            class_examples = [trainable(e) for e in class_examples]
            empty_cond = self._cond_copy(empty_cond) if empty_cond else None
            factors = self._initial_factors(device)
            self.base_stack = glue.get_lora_stack(self.model)
            stack = self.base_stack.with_lora(LoraEntry(self.file_name, 1.0, {
                path: (LowRankAdapter(f.down, f.up, self.alpha / self.rank, dropout=self.lora_dropout),)
                for path, f in factors.items()
            }))
            install_hooks(self.diffusion_model, stack.module_paths())
            params = {f"{path}.{part}": getattr(f, part) for path, f in factors.items() for part in ("down", "up")}
            self.ema = self._ema(params) if self.ema_decay else None
            trainer = fm.FlowMatchTrainer(self._predictor(stack, device), examples, empty_cond, params,
                                          self.settings, self.state, self.world, class_examples)
            lora_file = self._loop(trainer, factors, image_count=len(examples))
        trained = {path: (LowRankAdapter(f.down.detach().cpu(), f.up.detach().cpu(), self.alpha / self.rank),)
                   for path, f in self._saved_factors(factors).items()}
        model = glue.with_lora_stack(self.model, self.base_stack.with_lora(LoraEntry(self.file_name, 1.0, trained)))
        return model, lora_file, trainer.state.loss_history, self.sample_files

    def _ema(self, params: dict[str, torch.Tensor]) -> WeightEMA:
        """The EMA, continued from a resumed run's: its LoRA file holds the average, its
        train-state the raw weights (a run saved without EMA starts the average at its weights)."""
        shadow = None
        if self.resumed_ema is not None:
            shadow = {f"{path}.{part}": getattr(f, part) for path, f in self.resumed_ema.items() for part in ("down", "up")}
        return WeightEMA(params, self.ema_decay, shadow)

    def _saved_factors(self, factors: dict[str, ckpt.LoraFactors]) -> dict[str, ckpt.LoraFactors]:
        """What goes into the LoRA file: the EMA of the weights when on, else the weights."""
        if self.ema is None:
            return factors
        return {path: ckpt.LoraFactors(self.ema.shadow[f"{path}.down"], self.ema.shadow[f"{path}.up"])
                for path in factors}

    def _latent_cache(self, vae, clip) -> LatentCache:
        text_tensors = glue.text_encoder_tensors(clip)
        if text_tensors is None:
            log.info("FluxQTrainLoRA: the text encoders carry LoRA patches; caption embeddings are not cached")
        text_identity = model_fingerprint(text_tensors) if text_tensors is not None else None
        return LatentCache(cache_directory(), model_fingerprint(glue.vae_tensors(vae)), text_identity)

    @staticmethod
    def _cond_copy(cond: fm.Conditioning) -> fm.Conditioning:
        pooled = None if cond.pooled is None else cond.pooled.clone()
        return fm.Conditioning(cond.context.clone(), pooled)

    @staticmethod
    def _embedder(clip, cache: LatentCache | None):
        """caption -> Conditioning, each text encoded once (and kept on disk with a cache)."""
        embeddings: dict[str, fm.Conditioning] = {}

        def encode(text: str):
            context, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            # T5 alone (Chroma) and the FLUX.2 LLM encoders give no pooled vector
            return context[0].float().cpu(), None if pooled is None else pooled[0].float().cpu()

        def embed(text: str) -> fm.Conditioning:
            if text not in embeddings:
                pair = cache.embedding(text, lambda: encode(text)) if cache is not None else encode(text)
                embeddings[text] = fm.Conditioning(*pair)
            return embeddings[text]

        return embed

    def _latents(self, vae, images: list[Image.Image], cache: LatentCache | None) -> list[torch.Tensor]:
        """Each image fitted to its bucket and VAE-encoded (or read from the cache), in the
        model's latent space."""
        latent_format = self.model.model.process_latent_in  # FLUX: (z - 0.1159) * 0.3611
        sizes = [ds.nearest_bucket(image.width, image.height, self.buckets) for image in images]
        return [latent_format(raw[None]).float().cpu()[0] for raw in self._vae_latents(vae, images, sizes, cache)]

    @staticmethod
    def _vae_latents(vae, images: list[Image.Image], sizes: list[tuple[int, int]], cache: LatentCache | None
                     ) -> list[torch.Tensor]:
        """Each image fitted to its size and VAE-encoded, as the VAE gives it (cached by the
        image's pixels, the size and the VAE)."""
        latents = []
        for image, size in zip(images, sizes):
            def encode(image=image, size=size):
                return vae.encode(ds.image_to_tensor(ds.fit_to_bucket(image, size))[None])[0].float().cpu()

            latents.append(cache.latent(image, size, encode) if cache is not None else encode())
        return latents

    def _references(self, vae, cache: LatentCache | None) -> list[torch.Tensor | None]:
        """Edit pairs: each control image's latent, fitted to its TARGET's bucket rather than its
        own size, so that one bucket's references stack into a batch like its targets, and the
        control lines up with the target pixel for pixel as in ai-toolkit's Kontext training (the
        model takes a reference of any size: BFL's Kontext sampling scales the input image to one
        of its preferred sizes). Left as the VAE gives it: the model's extra_conds maps it, as for
        core's ReferenceLatent. None for every sample of a set without control images."""
        controls = [s for s in self.samples if s.control is not None]
        if not controls:
            return [None] * len(self.samples)
        if not glue.takes_reference_latents(self.model):
            raise ValueError(f"{self.detection.label} takes no reference image, so it cannot train on edit pairs "
                             f"({controls[0].control_name} and the other control images): train an edit model "
                             "(FLUX.1 Kontext, FLUX.2), or move the control/ folder out of the dataset")
        sizes = [ds.nearest_bucket(s.image.width, s.image.height, self.buckets) for s in controls]
        latents = iter(self._vae_latents(vae, [s.control for s in controls], sizes, cache))
        log.info("FluxQTrainLoRA: %d edit pair(s): the control images enter as reference tokens", len(controls))
        return [None if s.control is None else next(latents) for s in self.samples]

    def _encode(self, vae, embed, cache) -> tuple[list[fm.TrainingExample], fm.Conditioning | None]:
        latents = self._latents(vae, [sample.image for sample in self.samples], cache)
        references = self._references(vae, cache)
        # renders during training edit the first pair's control image, as the LoRA will be used
        self.sample_reference = None if references[0] is None else {"samples": references[0][None]}
        examples = [fm.TrainingExample(latent, embed(ds.compose_caption(self.trigger_word, sample.caption)), reference)
                    for latent, sample, reference in zip(latents, self.samples, references)]
        empty = embed("") if self.settings.caption_dropout > 0 else None
        log.info("FluxQTrainLoRA: %d images in %d bucket(s), %d draws per pass with kohya repeats",
                 len(examples), len({tuple(e.latent.shape) for e in examples}), sum(s.repeats for s in self.samples))
        return examples, empty

    def _encode_class_images(self, vae, embed, cache) -> list[fm.TrainingExample]:
        """Prior preservation's examples (none when it is off); generated ones are made first."""
        if not self.class_prompt:
            return []
        cond = embed(self.class_prompt)
        samples = self.class_samples or self._generated_class_samples(vae, cond)
        latents = self._latents(vae, [s.image for s in samples], cache)
        examples = [fm.TrainingExample(latent, cond) for latent, sample in zip(latents, samples)
                    for _ in range(sample.repeats)]
        log.info("FluxQTrainLoRA: prior preservation with %d class image(s) of %r, weight %g",
                 len(samples), self.class_prompt, self.settings.prior_loss_weight)
        return examples

    def _generated_class_samples(self, vae, cond: fm.Conditioning) -> list[ds.Sample]:
        """class_image_count images of class_prompt by the frozen model (seeds seed, seed+1, ...),
        kept in the cache folder under a key of everything they depend on: a later run with the
        same model, prompt, sampler settings, size and seed reads them instead of sampling again,
        and an interrupted generation resumes at the first missing image."""
        settings = self.render_settings
        key = hashlib.sha256(json.dumps({
            "model": model_fingerprint(self.diffusion_model.state_dict().items()),
            "loras": [(e.name, e.strength) for e in glue.get_lora_stack(self.model).entries],
            "prompt": self.class_prompt, "seed": self.settings.seed,
            "context": hashlib.sha256(cond.context.numpy().tobytes()).hexdigest(),
            "settings": dataclasses.asdict(settings),
        }, sort_keys=True).encode()).hexdigest()
        folder = os.path.join(cache_directory(), "class_images", key)
        os.makedirs(folder, exist_ok=True)
        samples, made = [], 0
        for i in range(self.class_image_count):
            path = os.path.join(folder, f"{i:05d}.png")
            if not os.path.isfile(path):
                glue.raise_if_cancelled()
                latent = self._render(self.model, cond, self.settings.seed + i, None)
                save_png(image_from_batch(glue.decode_images(vae, latent)), path)
                made += 1
            with Image.open(path) as image:
                samples.append(ds.Sample(path, image.convert("RGB"), self.class_prompt))
        log.info("FluxQTrainLoRA: %d class image(s) generated, %d reused from %s", made,
                 self.class_image_count - made, folder)
        return samples

    def _render(self, model, cond: fm.Conditioning, seed: int, reference: dict | None) -> torch.Tensor:
        """A latent of `cond` by `model` with the render settings (editing the `reference` latent
        when given), as FluxQSampler makes it."""
        settings = self.render_settings
        latent = sampling.empty_latent(settings, model)
        positive = glue.conditioning(cond.context, cond.pooled)
        negative = None if self.negative_cond is None else glue.conditioning(
            self.negative_cond.context, self.negative_cond.pooled)
        model, positive = sampling.prepare(model, positive, settings, latent, reference)
        negative = sampling.prepare_negative(negative, reference)
        return sampling.sample_latent(model, positive, settings, seed, latent, None, negative)["samples"]

    def _initial_factors(self, device) -> dict[str, ckpt.LoraFactors]:
        if self.resumed_factors is not None:
            source = self.resumed_factors
        else:
            generator = torch.Generator().manual_seed(self.settings.seed)
            source = {}
            for path, (in_features, out_features) in self.layers.items():
                down, up = fm.init_lora_factors(in_features, out_features, self.rank, generator)
                source[path] = ckpt.LoraFactors(down, up)
        # Parameters (what DDP syncs) of copies: factors read under ComfyUI's inference_mode
        # cannot be made trainable themselves
        return {path: ckpt.LoraFactors(torch.nn.Parameter(f.down.to(device).clone()),
                                       torch.nn.Parameter(f.up.to(device).clone()))
                for path, f in source.items()}

    def _predictor(self, stack, device) -> fm.VelocityPredictor:
        diffusion_model = self.diffusion_model
        dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()
        guidance = self.member.train_guidance
        options = {"patches_replace": {"dit": self._checkpointed_blocks(stack)}} if self.gradient_checkpointing else {}
        # bf16 compute with fp32 LoRA masters where ComfyUI chose bf16 for this GPU; older GPUs
        # (no bf16) and the CPU run in the model's own compute dtype.
        use_autocast = device.type == "cuda" and dtype == torch.bfloat16

        def predict(x_t, t, context, pooled, reference):
            # The inputs as the sampler gives them (the model's extra_conds: FLUX.2 pads the context,
            # Chroma takes guidance 0, edit pairs' control latents become reference tokens), with
            # the family's training guidance (registry). ComfyUI's FLUX forward returns the target
            # tokens alone (it crops its output to the noised image's tokens), so the loss never
            # covers the reference tokens.
            inputs = glue.model_inputs(self.model, x_t, context, pooled, guidance, dtype, reference)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
            with activate(stack, root=diffusion_model), autocast:
                return diffusion_model(x_t.to(dtype), t.float(), context=inputs.pop("c_crossattn"),
                                       transformer_options=dict(options), **inputs)

        return predict

    def _checkpointed_blocks(self, stack) -> dict:
        """ComfyUI's block-replace patches wrap each block in activation checkpointing. The block is
        bound here, not taken from `original_block`: that closure late-binds the loop variable, so by
        the time backward recomputes it would call the last block. The stack is re-activated inside,
        because the recomputation runs during backward (maybe on another thread). Inputs are copied
        because the blocks add their residual into them in place, and checkpoint keeps the inputs."""

        def double(block):
            def run(img, txt, vec, pe, attn_mask, options):
                with activate(stack, root=self.diffusion_model):
                    return block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=options)

            def replace(args, extra):
                img, txt = torch.utils.checkpoint.checkpoint(
                    run, args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                    args.get("transformer_options", {}), use_reentrant=False)
                return {"img": img, "txt": txt}

            return replace

        def single(block):
            def run(img, vec, pe, attn_mask, options):
                with activate(stack, root=self.diffusion_model):
                    return block(img.clone(), vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=options)

            def replace(args, extra):
                return {"img": torch.utils.checkpoint.checkpoint(
                    run, args["img"], args["vec"], args["pe"], args.get("attn_mask"),
                    args.get("transformer_options", {}), use_reentrant=False)}

            return replace

        model = self.diffusion_model
        patches = {("double_block", i): double(b) for i, b in enumerate(model.double_blocks)}
        patches.update({("single_block", i): single(b) for i, b in enumerate(model.single_blocks)})
        return patches

    def _loop(self, trainer: fm.FlowMatchTrainer, factors, image_count: int) -> str:
        """The one training loop (node and script alike): progress, cancel and checkpoints.

        ComfyUI's cancel raises `glue.Interrupted` wherever the run is (its progress hook, any
        layer's forward, a sample's sampler); the script's signals are seen between steps, by all
        ranks at once. Either way the optimizer has not moved past the last finished step (a step
        counts once `trainer.run` yields it), so that step is what gets saved."""
        total = self.settings.steps
        progress = glue.progress_bar(total, self.node_id)
        started = time.perf_counter()
        device = next(iter(factors.values())).down.device
        self.progress, self.sample_files, self.saved_step = progress, [], None
        try:
            progress.update_absolute(trainer.state.step)
            self._stop_if_requested(device)
            for step, loss in trainer.run():
                if self.ema is not None:
                    self.ema.update(trainer.params)
                rate = (step - self.first_step) / (time.perf_counter() - started)
                progress.update_absolute(step)
                glue.show_progress_text(f"step {step}/{total}  loss {loss:.4f}  {rate:.2f} it/s", self.node_id)
                if self.node_id is None and self.world.is_main:  # run as a script: the log is the progress
                    log.info("FluxQTrainLoRA: step %d/%d  loss %.4f  %.2f it/s", step, total, loss, rate)
                if not torch.isfinite(torch.tensor(loss)):  # the loss is averaged over the ranks: all agree
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
                self._stop_if_requested(device)
                if self.save_every and step % self.save_every == 0 and step < total:
                    self._save(trainer, factors, image_count, ckpt.step_checkpoint_name(self.name, step))
                if self.sample_every and step % self.sample_every == 0 and self.world.is_main:
                    self._samples(factors, step)
        except glue.Interrupted:
            glue.clear_cancel()  # when the trainer saw ComfyUI's cancel between steps
            raise self._cancelled(trainer, factors, image_count) from None
        return self._save(trainer, factors, image_count, self.file_name)

    def _stop_if_requested(self, device) -> None:
        """A cancel pressed in ComfyUI, or the script's signal on any rank, stops every rank here."""
        if self.world.any(glue.cancel_requested() or self.stop_requested(), device):
            raise glue.TrainingCancelled("cancelled")  # completed by _cancelled

    def _cancelled(self, trainer, factors, image_count: int) -> Exception:
        """Saves the last finished step (unless already saved) and says where it is."""
        step, total = trainer.state.step, self.settings.steps
        saved = self.file_name if step == total else ckpt.step_checkpoint_name(self.name, step)
        if step > self.first_step:
            if self.saved_step != step:
                self._save(trainer, factors, image_count, saved)
            text = (f"cancelled after step {step}/{total}: saved {saved} in {self.folder}"
                    + ("" if step == total else f"; continue with resume = {saved}"))
        elif self.resume_name:
            saved = self.resume_name
            text = f"cancelled before step {step + 1} finished: nothing new to save, {saved} still holds step {step}"
        else:
            saved = None
            text = "cancelled before the first step finished: nothing was saved"
        if self.world.is_main:
            if saved is None and self.replaced:
                text += " (the earlier run's files under this lora_name were kept)"
            log.warning("FluxQTrainLoRA: %s", text)
            glue.show_progress_text(text, self.node_id)
        else:  # only rank 0 writes: the other ranks say so rather than claim the file
            text = f"rank {self.world.rank}: cancelled after step {step}/{total}" + (
                f"; rank 0 writes {saved}" if step > self.first_step else "; no new step to save")
            log.info("FluxQTrainLoRA: %s", text)
        return glue.TrainingCancelled(text, saved, step)

    def _samples(self, factors, step: int) -> None:
        """Renders every sample prompt with the LoRA as it is now (the average with EMA: what the
        file would hold) through the runtime path, shows each on the node and saves it to
        output/<lora_name>_samples/<lora_name>_step<step>_<prompt index>.png."""
        adapters = {path: (LowRankAdapter(f.down.detach().clone(), f.up.detach().clone(), self.alpha / self.rank),)
                    for path, f in self._saved_factors(factors).items()}
        model = glue.with_lora_stack(self.model, self.base_stack.with_lora(LoraEntry(self.file_name, 1.0, adapters)))
        subfolder = samples_subfolder(self.name)
        folder = os.path.join(folder_paths.get_output_directory(), subfolder)
        os.makedirs(folder, exist_ok=True)
        for index, cond in enumerate(self.sample_conds):
            with torch.no_grad():  # inside the training region: nothing here is for backward
                image = image_from_batch(glue.decode_images(
                    self.vae, self._render(model, cond, self.sample_seed, self.sample_reference)))
            file_name = f"{self.name}_step{step:06d}_{index}.png"
            save_png(image, os.path.join(folder, file_name))
            self.sample_files.append({"filename": file_name, "subfolder": subfolder, "type": "output"})
            glue.show_preview(self.progress, step, image)
        glue.show_progress_text(f"step {step}: {len(self.sample_conds)} sample(s) saved to output/{subfolder}",
                                self.node_id)
        log.info("FluxQTrainLoRA: step %d: %d sample(s) saved to %s", step, len(self.sample_conds), folder)
        # Sampling may have had ComfyUI load the VAE beside the model: the model stays fully loaded.
        glue.load_for_training(self.model)

    def _save(self, trainer, factors, image_count: int, file_name: str) -> str:
        member = glue.model_family(self.model).member  # Kontext/Krea files read as dev: same tensors
        metadata = ckpt.lora_metadata(
            base_model=member.base_model, base_model_version=member.base_model_version,
            network_module=member.network_module, rank=self.rank, alpha=self.alpha, steps=trainer.state.step,
            trigger_word=self.trigger_word,
            image_count=image_count, resolution=self.resolution, run_id=self.run_id,
        )
        self.saved_step = trainer.state.step
        if not self.world.is_main:
            return file_name
        raw = {} if self.ema is None else {f"{RAW}{path}.{part}": getattr(f, part)
                                           for path, f in factors.items() for part in ("down", "up")}
        state = fm.TrainState(trainer.state.step, list(trainer.state.loss_history), trainer.optimizer_state(), raw)
        ckpt.save_checkpoint(os.path.join(self.folder, file_name), self._saved_factors(factors), self.alpha, metadata,
                             state, self.state_info)
        ckpt.prune_step_checkpoints(self.folder, self.name, self.keep_last, self.run_id)
        self._delete_replaced()
        log.info("FluxQTrainLoRA: saved %s at step %d", file_name, trainer.state.step)
        glue.show_progress_text(f"saved {file_name} in {self.folder} at step {trainer.state.step}", self.node_id)
        return file_name

    def _delete_replaced(self) -> None:
        """replace_existing: the earlier run's files go once this run has a checkpoint of its own
        (so a run cancelled before its first save leaves them), files it overwrote by name
        excepted."""
        if not (self.replaced or self.old_samples):
            return
        still_other = set(ckpt.other_runs_files(self.folder, self.name, self.run_id))
        for path in self.replaced:
            if path in still_other:
                ckpt.delete_checkpoint(path)
                log.info("FluxQTrainLoRA: deleted %s of an earlier run (replace_existing)", path)
        written = {entry["filename"] for entry in self.sample_files}
        for path in self.old_samples:
            if os.path.basename(path) not in written and os.path.exists(path):
                os.remove(path)
        if self.old_samples:
            log.info("FluxQTrainLoRA: deleted %d sample image(s) of an earlier run (replace_existing)",
                     len(self.old_samples))
        self.replaced, self.old_samples = [], []


