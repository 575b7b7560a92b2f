"""FluxQTrainLoRA: trains a kohya-format LoRA on a frozen FLUX base (GGUF-quantized or not).

A thin node: the run itself is nodes/training.py, shared with scripts/fluxq_train.py.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

import folder_paths
from comfy_api.latest import io, ui

from ..lora_ops import flow_match as fm
from .comfy_glue import check_file_choice
from .sampling import SETTINGS
from .training import NONE, dataset_options, train_lora

CATEGORY = "Flux QLoRA Lab/training"


class FluxQTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQTrainLoRA",
            display_name="Train FLUX LoRA (FluxQ)",
            category=CATEGORY,
            description="Trains a LoRA on a frozen FLUX model (QLoRA on GGUF bases) by flow matching and saves it "
                        "in kohya format to models/loras, loadable by core LoraLoader, FluxQ and diffusers.",
            is_output_node=True,
            is_input_list=True,  # so `images`/`captions` can come from core's dataset nodes (lists)
            inputs=[
                io.Model.Input("model", tooltip="A FLUX family model (FLUX.1 dev/schnell/Kontext/Krea, FLUX.2 dev, klein "
                                                "base, Chroma); stays frozen. Fill is not trained."),
                io.Vae.Input("vae", tooltip="The FLUX VAE; images are encoded once."),
                io.Clip.Input("clip", tooltip="Text encoders; every caption is encoded once, then they can leave the device."),
                io.Combo.Input("dataset", options=dataset_options(), default=NONE,
                               tooltip="A folder under input/ (or a .zip/.tar there) of images with same-name .txt captions. "
                                       "Edit pairs (Kontext, FLUX.2): a control/ folder beside the images holds "
                                       "each one's image before the edit under the same name; the caption is the "
                                       "instruction."),
                io.String.Input("trigger_word", default="TOK", tooltip="Prepended to every caption."),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01, tooltip="Scale is alpha / rank."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Total optimizer steps (a resumed run counts on)."),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=256),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=16,
                             tooltip="Target side; images go to aspect-ratio buckets of about resolution² pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False),
                io.Combo.Input("optimizer", options=list(fm.OPTIMIZERS), default="adamw"),
                io.Combo.Input("lr_schedule", options=list(fm.LR_SCHEDULES), default="constant"),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000),
                io.Float.Input("caption_dropout", default=0.05, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("timestep_sampling", options=list(fm.TIMESTEP_SCHEMES), default="shift",
                               tooltip="shift: logit-normal with the model family's shift (FLUX.1: resolution-dependent; "
                                       "FLUX.2: Flux2Scheduler's; Chroma: fixed); uniform: t ~ U(0, 1)."),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.String.Input("layer_regex", default="", tooltip="Only train layers whose path matches, e.g. ^double_blocks\\. (empty: all block linears)."),
                io.Int.Input("save_every", default=250, min=0, max=100000, tooltip="Checkpoint every N steps (0: only at the end)."),
                io.Int.Input("keep_last", default=3, min=0, max=1000, tooltip="Step checkpoints to keep (0: all)."),
                io.String.Input("lora_name", default="fluxq_lora", tooltip="File name in models/loras (no folders)."),
                io.Combo.Input("resume", options=[NONE, *folder_paths.get_filename_list("loras")], default=NONE,
                               tooltip="Continue from a LoRA this node saved (needs its .trainstate beside it)."),
                io.Image.Input("images", optional=True, tooltip="Images from core dataset nodes, instead of `dataset`."),
                io.String.Input("captions", optional=True, force_input=True, tooltip="Captions matching `images`."),
                io.String.Input("dataset_name", optional=True, force_input=True,
                                tooltip="A dataset folder/archive name under input/ from another node (e.g. "
                                        "FluxQPrepareDataset); overrides `dataset`."),
                io.Boolean.Input("replace_existing", default=False, optional=True,
                                 tooltip="When files of an earlier training run already use lora_name (the final "
                                         "LoRA or its _stepNNNNNN checkpoints): off refuses to start; on deletes "
                                         "them and starts over. A resumed run keeps its own files either way."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, optional=True,
                               tooltip="Exponential moving average of the LoRA weights, updated every step "
                                       "(0: off; ai-toolkit's FLUX recipes use 0.99-0.999). When on, the saved "
                                       "LoRA and the samples use the average; the raw weights stay in the "
                                       ".trainstate so a resume continues both."),
                io.Float.Input("lora_dropout", default=0.0, min=0.0, max=0.9, step=0.01, optional=True,
                               tooltip="Dropout on the LoRA path's input while training (as PEFT's lora_dropout; "
                                       "common FLUX recipes use 0.1). Never applied when sampling."),
                io.Boolean.Input("cache_latents_to_disk", default=False, optional=True,
                                 tooltip="Keep the encoded latents and caption embeddings in ComfyUI's user folder "
                                         "(user/fluxq_cache), keyed by image content, bucket and the VAE's and text "
                                         "encoders' identity: a later run with the same data skips encoding; a "
                                         "changed image or model is encoded again."),
                io.Int.Input("sample_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Render the sample prompts every N steps (0: off); shown on the node and "
                                     "saved as output/<lora_name>_samples/<lora_name>_step<N>_<prompt>.png."),
                io.String.Input("sample_prompts", default="", multiline=True, optional=True,
                                tooltip="Sample prompts, one per line; write the trigger word where you want it."),
                io.Int.Input("sample_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             optional=True, tooltip="Seed of every sample (the same noise at every step)."),
                SETTINGS.Input("sample_settings", optional=True,
                               tooltip="Steps, guidance, sampler and shift for the samples and generated class "
                                       "images (their size is `resolution`). Without it: the flux-dev preset (28 "
                                       "steps, guidance 3.5) on dev, flux-schnell (4 steps) on schnell."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Prior preservation (DreamBooth): the class of the subject, e.g. 'a photo of "
                                        "a dog'. Empty: off."),
                io.Combo.Input("class_images", options=dataset_options(), default=NONE, optional=True,
                               tooltip="A folder under input/ (or a .zip/.tar there) of class images, all captioned "
                                       "class_prompt. [none]: generate class_image_count of them at the start."),
                io.Int.Input("class_image_count", default=0, min=0, max=10000, optional=True,
                             tooltip="Class images to generate with the frozen model (seeds seed, seed+1, ...) when "
                                     "class_images is [none]; kept in user/fluxq_cache and reused by a later run "
                                     "with the same model, prompt, sampler settings, resolution and seed."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Loss = instance loss + this x class loss, on the same step."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.String.Output(display_name="lora_file", tooltip="Saved file name in models/loras."),
                io.Image.Output(display_name="loss_curve"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, resume=None):
        # is_input_list: widget values arrive as 1-lists
        name = resume[0] if isinstance(resume, list) else resume
        return True if name is None else check_file_choice("loras", "resume", name, (NONE,))

    @classmethod
    def execute(cls, images=None, captions=None, dataset_name=None, sample_settings=None, **lists) -> io.NodeOutput:
        settings = {name: values[0] for name, values in lists.items()}  # scalars arrive as 1-lists
        model, vae, clip = settings.pop("model"), settings.pop("vae"), settings.pop("clip")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        trained_model, lora_file, losses, sample_files = train_lora(
            model, vae, clip, settings, images, captions, node_id,
            dataset_name=dataset_name[0] if dataset_name else None,
            sample_settings=sample_settings[0] if sample_settings else None)
        curve = draw_loss_curve(losses)
        # the loss curve, then every sample saved during the run
        shown = ui.PreviewImage(curve, cls=cls).as_dict()
        shown["images"] = [*shown["images"], *sample_files]
        return io.NodeOutput(trained_model, lora_file, curve, ui=shown)


def draw_loss_curve(losses: list[float], size: tuple[int, int] = (512, 256)) -> torch.Tensor:
    """The loss per step as a ComfyUI IMAGE (1, H, W, 3)."""
    width, height = size
    margin = 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line([(margin, 4), (margin, height - margin), (width - 4, height - margin)], fill="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        plot_w, plot_h = width - margin - 8, height - margin - 8
        points = [(margin + plot_w * i / max(1, len(losses) - 1), 4 + plot_h * (high - v) / span)
                  for i, v in enumerate(losses)]
        draw.line(points if len(points) > 1 else points * 2, fill=(30, 90, 200), width=2)
        draw.text((2, 2), f"{high:.3g}", fill="black")
        draw.text((2, height - margin - 10), f"{low:.3g}", fill="black")
        draw.text((margin, height - margin + 6), f"loss, {len(losses)} steps", fill="black")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


NODES = [FluxQTrainLoRA]
