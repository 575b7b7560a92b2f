"""The training run behind FluxQTrainLoRA and scripts/fluxq_train.py: one code path for both.

The math and the loop live in lora_ops (flow_match, dataset, lora_checkpoint, distributed); this
module wires them to ComfyUI (VAE/CLIP encoding, device placement, progress, cancel, model
folders), reaching ComfyUI's internals only through comfy_glue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid

import numpy as np
import torch
import torch.utils.checkpoint
from PIL import Image

import folder_paths

from ..lora_ops import dataset as ds
from ..lora_ops import flow_match as fm
from ..lora_ops import lora_checkpoint as ckpt
from ..lora_ops.distributed import World
from ..lora_ops.lora_runtime import LoraEntry, LowRankAdapter, activate, install_hooks
from . import comfy_glue as glue

NONE = "[none]"
# kohya's FLUX targets: every linear layer inside the transformer blocks.
BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")

log = logging.getLogger("fluxq")


def dataset_options() -> list[str]:
    input_dir = folder_paths.get_input_directory()
    archives = [f for f in os.listdir(input_dir) if ds.is_archive(f)] if os.path.isdir(input_dir) else []
    return [NONE, *sorted(folder_paths.get_input_subfolders()), *sorted(archives)]


def train_lora(model, vae, clip, settings: dict, images=None, captions=None, node_id=None, world: World = World(),
               dataset_name=None):
    """Trains with the node's settings (its widget inputs by name); returns the model with the
    LoRA applied, the saved file name and the loss per step. `dataset_name` (a dataset name from
    another node) overrides settings["dataset"]."""
    settings = dict(settings)
    dataset = settings.pop("dataset")
    samples = collect_samples(dataset_name or dataset, images, captions)
    run = TrainingRun(model, samples, node_id=node_id, world=world, **settings)
    return run.train(vae, clip)


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
        path = os.path.join(folder_paths.get_input_directory(), dataset)
        input_dir = os.path.abspath(folder_paths.get_input_directory())
        if os.path.commonpath([input_dir, os.path.abspath(path)]) != input_dir:
            raise ValueError(f"dataset {dataset!r} is outside the input folder")
        return ds.read_dataset(path)
    if not images:
        raise ValueError("no training images: choose a `dataset` or connect `images`")
    frames = [frame for batch in images for frame in batch]
    texts = list(captions or [])
    if texts and len(texts) != len(frames):
        raise ValueError(f"{len(texts)} captions for {len(frames)} images")
    return [
        ds.Sample(f"images[{i}]", Image.fromarray((frame.cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)),
                  texts[i] if texts else None)
        for i, frame in enumerate(frames)
    ]


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
                 layer_regex, save_every, keep_last, lora_name, resume, replace_existing=False):
        self.model, self.samples, self.node_id, self.world = model, samples, node_id, world
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
            seed=seed,
        )
        self.diffusion_model = model.model.diffusion_model
        self.layers = trainable_layers(self.diffusion_model, layer_regex, rank)
        self.state_info = {"optimizer": optimizer, "rank": rank, "alpha": alpha, "seed": seed,
                           "layer_regex": layer_regex, "resolution": resolution}
        self.resumed_factors, self.state, resumed_run, resume_path = self._load_resume(resume)
        # Checkpoints are pruned by run, not by name; a resumed run goes on under its own id.
        # (Only rank 0 writes, so the other ranks' ids never reach a file.)
        self.run_id = resumed_run or uuid.uuid4().hex
        self.state_info["run_id"] = self.run_id
        self.replaced = [path for path in ckpt.other_runs_files(self.folder, self.name, self.run_id)
                         if os.path.abspath(path) != resume_path]
        if self.replaced and not replace_existing:
            raise ValueError(
                f"lora_name {self.name!r}: {', '.join(os.path.basename(p) for p in self.replaced)} in {self.folder} "
                "belong to an earlier training run. Pick another lora_name, continue that run with `resume`, or turn "
                "on `replace_existing` to delete them and start over."
            )

    def _load_resume(self, resume: str):
        """(factors, state, run id, path) of the checkpoint to continue; Nones for a new run."""
        if resume == NONE:
            return None, None, None, None
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
        return factors, state, info.get("run_id"), path

    def diffusion_model_paths(self) -> list[str]:
        return [path for path, _ in self.diffusion_model.named_modules()]

    def train(self, vae, clip):
        if self.world.is_main:
            for path in self.replaced:  # the user chose replace_existing
                ckpt.delete_checkpoint(path)
                log.info("FluxQTrainLoRA: deleted %s of an earlier run (replace_existing)", path)
        examples, empty_cond = self._encode(vae, clip)
        device = glue.load_for_training(self.model)
        make_autograd_safe(self.diffusion_model)
        self.diffusion_model.requires_grad_(False)
        with torch.inference_mode(False), norm_inputs_copied(self.diffusion_model), glue.training_mode():
            examples = [fm.TrainingExample(e.latent.to(device).clone(), self._cond_to(e.cond, device)) for e in examples]
            # kohya repeats: an image of a `10_name/` folder is listed ten times (the same tensors),
            # so the trainer draws it ten times as often.
            examples = [e for e, sample in zip(examples, self.samples) for _ in range(sample.repeats)]
            empty_cond = self._cond_to(empty_cond, device) if empty_cond else None
            factors = self._initial_factors(device)
            stack = glue.get_lora_stack(self.model).with_lora(LoraEntry(self.file_name, 1.0, {
                path: (LowRankAdapter(f.down, f.up, self.alpha / self.rank),) for path, f in factors.items()
            }))
            install_hooks(self.diffusion_model, stack.module_paths())
            params = {f"{path}.{part}": getattr(f, part) for path, f in factors.items() for part in ("down", "up")}
            trainer = fm.FlowMatchTrainer(self._predictor(stack, device), examples, empty_cond, params,
                                          self.settings, self.state, self.world)
            lora_file = self._loop(trainer, factors, image_count=len(examples))
        trained = {path: (LowRankAdapter(f.down.detach().cpu(), f.up.detach().cpu(), self.alpha / self.rank),)
                   for path, f in factors.items()}
        model = glue.with_lora_stack(self.model, glue.get_lora_stack(self.model).with_lora(LoraEntry(self.file_name, 1.0, trained)))
        return model, lora_file, trainer.state.loss_history

    @staticmethod
    def _cond_to(cond: fm.Conditioning, device) -> fm.Conditioning:
        return fm.Conditioning(cond.context.to(device).clone(), cond.pooled.to(device).clone())

    def _encode(self, vae, clip) -> tuple[list[fm.TrainingExample], fm.Conditioning | None]:
        latent_format = self.model.model.process_latent_in  # FLUX: (z - 0.1159) * 0.3611
        embeddings: dict[str, fm.Conditioning] = {}

        def embed(text: str) -> fm.Conditioning:
            if text not in embeddings:
                context, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
                embeddings[text] = fm.Conditioning(context[0].float().cpu(), pooled[0].float().cpu())
            return embeddings[text]

        examples = []
        for sample in self.samples:
            size = ds.nearest_bucket(sample.image.width, sample.image.height, self.buckets)
            pixels = ds.image_to_tensor(ds.fit_to_bucket(sample.image, size))[None]
            latent = latent_format(vae.encode(pixels)).float().cpu()[0]
            examples.append(fm.TrainingExample(latent, embed(ds.compose_caption(self.trigger_word, sample.caption))))
        empty = embed("") if self.settings.caption_dropout > 0 else None
        log.info("FluxQTrainLoRA: %d images in %d bucket(s), %d captions encoded, %d draws per pass with kohya "
                 "repeats", len(examples), len({tuple(e.latent.shape) for e in examples}), len(embeddings),
                 sum(s.repeats for s in self.samples))
        return examples, empty

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
        guidance_embed = getattr(diffusion_model.params, "guidance_embed", False)
        options = {"patches_replace": {"dit": self._checkpointed_blocks(stack)}} if self.gradient_checkpointing else {}
        # bf16 compute with fp32 LoRA masters where ComfyUI chose bf16 for this GPU; older GPUs
        # (no bf16) and the CPU run in the model's own compute dtype.
        use_autocast = device.type == "cuda" and dtype == torch.bfloat16

        def predict(x_t, t, context, pooled):
            # FLUX dev is trained with its distilled guidance fixed at 1.0 (kohya's advice for dev).
            guidance = torch.ones_like(t) if guidance_embed else None
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
            with activate(stack), autocast:
                return diffusion_model(x_t.to(dtype), t.float(), context=context.to(dtype), y=pooled.to(dtype),
                                       guidance=guidance, transformer_options=dict(options))

        return predict

    def _checkpointed_blocks(self, stack) -> dict:
        """ComfyUI's block-replace patches wrap each block in activation checkpointing. The block is
        bound here, not taken from `original_block`: that closure late-binds the loop variable, so by
        the time backward recomputes it would call the last block. The stack is re-activated inside,
        because the recomputation runs during backward (maybe on another thread). Inputs are copied
        because the blocks add their residual into them in place, and checkpoint keeps the inputs."""

        def double(block):
            def run(img, txt, vec, pe, attn_mask, options):
                with activate(stack):
                    return block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=options)

            def replace(args, extra):
                img, txt = torch.utils.checkpoint.checkpoint(
                    run, args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                    args.get("transformer_options", {}), use_reentrant=False)
                return {"img": img, "txt": txt}

            return replace

        def single(block):
            def run(img, vec, pe, attn_mask, options):
                with activate(stack):
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
        """The one training loop (node and script alike): progress, cancel and checkpoints."""
        total = self.settings.steps
        progress = glue.progress_bar(total, self.node_id)
        progress.update_absolute(trainer.state.step)
        started, first_step = time.perf_counter(), trainer.state.step
        device = next(iter(factors.values())).down.device
        for step, loss in trainer.run():
            rate = (step - first_step) / (time.perf_counter() - started)
            progress.update_absolute(step)
            glue.show_progress_text(f"step {step}/{total}  loss {loss:.4f}  {rate:.2f} it/s", self.node_id)
            if self.node_id is None and self.world.is_main:  # run as a script: the log is the progress
                log.info("FluxQTrainLoRA: step %d/%d  loss %.4f  %.2f it/s", step, total, loss, rate)
            if not torch.isfinite(torch.tensor(loss)):  # the loss is averaged over the ranks: all agree
                raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
            if self.world.any(glue.cancel_requested(), device):
                self._save(trainer, factors, image_count, ckpt.step_checkpoint_name(self.name, step))
                glue.request_cancel()  # the ranks that did not see it stop the same way
                glue.raise_if_cancelled()
            if self.save_every and step % self.save_every == 0 and step < total:
                self._save(trainer, factors, image_count, ckpt.step_checkpoint_name(self.name, step))
        return self._save(trainer, factors, image_count, self.file_name)

    def _save(self, trainer, factors, image_count: int, file_name: str) -> str:
        metadata = ckpt.lora_metadata(
            base_model="flux1-dev" if getattr(self.diffusion_model.params, "guidance_embed", False) else "flux1-schnell",
            rank=self.rank, alpha=self.alpha, steps=trainer.state.step, trigger_word=self.trigger_word,
            image_count=image_count, resolution=self.resolution, run_id=self.run_id,
        )
        if not self.world.is_main:
            return file_name
        state = fm.TrainState(trainer.state.step, list(trainer.state.loss_history), trainer.optimizer_state())
        ckpt.save_checkpoint(os.path.join(self.folder, file_name), factors, self.alpha, metadata, state, self.state_info)
        ckpt.prune_step_checkpoints(self.folder, self.name, self.keep_last, self.run_id)
        log.info("FluxQTrainLoRA: saved %s at step %d", file_name, trainer.state.step)
        return file_name


