"""Runtime LoRA nodes: apply (with strength) and remove, without touching any weight."""

import folder_paths
from comfy_api.latest import io

from ..lora_ops.block_weights import BlockWeightsError, parse_block_weights
from ..lora_ops.lora_runtime import MAX_STRENGTH, REMOVE_ALL
from .comfy_glue import (
    check_file_choice,
    get_lora_stack,
    load_lora_entry,
    model_block_weights,
    show_progress_text,
    with_lora_stack,
    without_clip_lora,
)

CATEGORY = "Flux QLoRA Lab/lora"


class FluxQApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQApplyLoRA",
            display_name="Apply LoRA (FluxQ runtime)",
            category=CATEGORY,
            description="Adds a LoRA as a separate low-rank path beside the (quantized) weights: "
                        "y = Wx + strength·(alpha/rank)·B(Ax). Nothing is merged, so strength changes and "
                        "removal are instant and exact. Chain several to stack them; applying a file that is already "
                        "applied replaces it (on MODEL and CLIP alike: the strength is set, not added). Reads kohya, "
                        "diffusers/PEFT (ai-toolkit), XLabs and BFL-native FLUX LoRAs.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A FLUX family LoRA (FLUX.1, FLUX.2, Chroma; the common trainers' formats) "
                                       "from models/loras (.safetensors)."),
                io.Float.Input("strength_model", default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.01,
                               tooltip="Scale of the LoRA on the transformer; 0 gives exactly the base model."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect to also apply the LoRA's CLIP-L (lora_te1_) part, if it has one."),
                io.Float.Input("strength_clip", default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.01,
                               tooltip="Scale of the LoRA on CLIP-L (core ComfyUI patching)."),
                # A socket, not a widget: a new widget would shift every saved workflow's widget values.
                io.String.Input("block_weights", optional=True, force_input=True,
                                tooltip="Per-block strengths (connect a text node, e.g. core's String (Multiline)): "
                                        "each layer inside a double / single block runs at "
                                        "strength_model x its block's weight (layers outside the blocks and the "
                                        "CLIP part at the strength). Empty: every block 1. A preset (all, none, "
                                        "double only, single only, first half, second half) and/or ranges, left to "
                                        "right, later wins, unnamed blocks 1: 'd0-9=1, s10-37=0.5', 'none, d*=1', "
                                        "'s*=0'. Block numbers must exist in the loaded model (FLUX.1: d0-18, "
                                        "s0-37; FLUX.2 [dev]: d0-7, s0-47). Weight 0 is exactly the model without "
                                        "that block's LoRA; changing weights reloads and recompiles nothing."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, lora_name, block_weights=None):
        # The syntax is checked at queue time; the block numbers need the model (execute).
        if isinstance(block_weights, str):
            try:
                parse_block_weights(block_weights)
            except BlockWeightsError as error:
                return str(error)
        return check_file_choice("loras", "lora_name", lora_name)

    @classmethod
    def execute(cls, model, lora_name, strength_model, clip=None, strength_clip=1.0,
                block_weights="") -> io.NodeOutput:
        weights = model_block_weights(model, block_weights or "")
        entry, clip_out, report = load_lora_entry(model, lora_name, strength_model, clip, strength_clip, weights)
        patched = with_lora_stack(model, get_lora_stack(model).with_lora(entry))
        show_progress_text(report, cls.hidden.unique_id)
        return io.NodeOutput(patched, clip_out if clip_out is not None else clip, ui={"text": [report]})


class FluxQRemoveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQRemoveLoRA",
            display_name="Remove LoRA (FluxQ runtime)",
            category=CATEGORY,
            description="Removes a LoRA applied upstream by 'Apply LoRA (FluxQ runtime)' from the MODEL and, when "
                        "connected, from the CLIP. The result is bit for bit the model (and CLIP) without it; no "
                        "weights are reloaded.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=[REMOVE_ALL, *folder_paths.get_filename_list("loras")],
                               default=REMOVE_ALL, tooltip="The LoRA to remove, or 'all'."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect the CLIP that came out of the same Apply LoRA chain to remove the "
                                      "LoRA's CLIP-L part too ('all': every FluxQ LoRA's; core LoraLoader patches "
                                      "stay)."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        return check_file_choice("loras", "lora_name", lora_name, (REMOVE_ALL,))

    @classmethod
    def execute(cls, model, lora_name, clip=None) -> io.NodeOutput:
        model_out = with_lora_stack(model, get_lora_stack(model).without(lora_name))
        return io.NodeOutput(model_out, without_clip_lora(clip, lora_name) if clip is not None else None)


NODES = [FluxQApplyLoRA, FluxQRemoveLoRA]
