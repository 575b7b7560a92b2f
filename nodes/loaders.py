"""GGUF loaders: the FLUX transformer and its text encoders, weights kept quantized."""

import folder_paths
from comfy_api.latest import io

from .comfy_glue import (
    DEQUANT_DTYPES,
    RESIDENT_MODES,
    TEXT_ENCODER_TYPES,
    check_file_choice,
    load_flux_gguf,
    load_text_encoders,
    model_family,
    show_progress_text,
)

CATEGORY = "Flux QLoRA Lab/loaders"
NO_T5 = "none"

# ComfyUI lists only .safetensors/.ckpt/... in its model folders; register .gguf views of the
# same folders so the dropdowns show them. The folder lists are shared, not copied, so paths
# added later (extra_model_paths.yaml) appear here too.
GGUF_UNET_FOLDER = "fluxq_gguf_unet"
TEXT_ENCODER_FOLDER = "fluxq_text_encoders"
folder_paths.folder_names_and_paths[GGUF_UNET_FOLDER] = (folder_paths.folder_names_and_paths["diffusion_models"][0], {".gguf"})
folder_paths.folder_names_and_paths[TEXT_ENCODER_FOLDER] = (
    folder_paths.folder_names_and_paths["text_encoders"][0], {".gguf", ".safetensors", ".sft"}
)


class FluxQLoadGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQLoadGGUF",
            display_name="Load FLUX GGUF (FluxQ)",
            category=CATEGORY,
            description="Loads a FLUX family transformer (FLUX.1 dev/schnell/Kontext/Krea/Fill, FLUX.2 dev/"
                        "klein, Chroma) from a .gguf file and says which member it detected. Weights stay "
                        "quantized in memory and are dequantized layer by layer at run time.",
            inputs=[
                io.Combo.Input("gguf_name", options=folder_paths.get_filename_list(GGUF_UNET_FOLDER),
                               tooltip="A FLUX family .gguf from models/diffusion_models or models/unet "
                                       "(e.g. flux1-dev-Q8_0.gguf, flux2-dev-Q4_K_M.gguf)."),
                io.Combo.Input("dequant_dtype", options=list(DEQUANT_DTYPES), default="auto",
                               tooltip="Precision of the dequantization arithmetic. 'auto' dequantizes straight "
                                       "to the model's compute dtype (bf16 on recent GPUs, fp32 on CPU), where the "
                                       "matmul always runs."),
                io.Combo.Input("resident", options=list(RESIDENT_MODES), default="auto", optional=True,
                               tooltip="Keep dequantized copies of the quantized layers (with runtime LoRAs folded "
                                       "in) so they run at native float speed. 'auto': on a GPU, only in memory "
                                       "ComfyUI reports free beyond what the sampling needs (never on the CPU or in "
                                       "lowvram mode); dropped when ComfyUI unloads the model. 'on': every layer "
                                       "(needs the memory of the unquantized model). 'off': always dequantize per "
                                       "call (the model holds only the GGUF bytes). Optional, so API prompts "
                                       "written before it existed still run (as 'auto')."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, gguf_name):
        # only the input it checks: ComfyUI reports a failure once per argument taken here
        return check_file_choice(GGUF_UNET_FOLDER, "gguf_name", gguf_name)

    @classmethod
    def execute(cls, gguf_name, dequant_dtype, resident="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(GGUF_UNET_FOLDER, gguf_name)
        model = load_flux_gguf(path, dequant_dtype, resident)
        # what was detected, and which members/variants the file cannot tell apart (the user picks the preset)
        report = f"{gguf_name}: {model_family(model).describe()}"
        show_progress_text(report, cls.hidden.unique_id if cls.hidden else None)
        return io.NodeOutput(model, ui={"text": [report]})


class FluxQLoadTextEncodersGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        encoders = folder_paths.get_filename_list(TEXT_ENCODER_FOLDER)
        return io.Schema(
            node_id="FluxQLoadTextEncodersGGUF",
            display_name="Load FLUX Text Encoders GGUF (FluxQ)",
            category=CATEGORY,
            description="Loads the text encoders of a FLUX model from .gguf or .safetensors files in "
                        "models/text_encoders (or models/clip): CLIP-L + T5-XXL for FLUX.1, Mistral-Small 3.x "
                        "for FLUX.2 [dev], Qwen3 4B/8B for FLUX.2 [klein], T5-XXL alone for Chroma. "
                        "Quantized weights stay quantized.",
            inputs=[
                io.Combo.Input("clip_name", options=encoders,
                               tooltip="CLIP-L for FLUX.1 (e.g. clip_l.safetensors); for the other types the one "
                                       "encoder file (flux2: a Mistral-Small 3.x llama.cpp GGUF; klein: a Qwen3 "
                                       "4B/8B GGUF; chroma: T5-XXL)."),
                io.Combo.Input("t5_name", options=[NO_T5, *encoders], default=NO_T5,
                               tooltip="T5-XXL for FLUX.1, e.g. t5-v1_1-xxl-encoder-Q8_0.gguf. 'none' loads CLIP-L alone "
                                       "(only for models whose text input is 768 wide, such as the tiny test models). "
                                       "Must be 'none' for the other types."),
                io.Combo.Input("type", options=list(TEXT_ENCODER_TYPES), default="flux1", optional=True,
                               tooltip="flux1: FLUX.1 dev/schnell, Kontext, Krea, Fill (CLIP-L + T5). "
                                       "flux2: FLUX.2 [dev] (Mistral). klein: FLUX.2 [klein] (Qwen3; ComfyUI 0.33+). "
                                       "chroma: Chroma (T5 alone)."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def validate_inputs(cls, clip_name, t5_name):
        clip_ok = check_file_choice(TEXT_ENCODER_FOLDER, "clip_name", clip_name)
        return clip_ok if clip_ok is not True else check_file_choice(TEXT_ENCODER_FOLDER, "t5_name", t5_name, (NO_T5,))

    @classmethod
    def execute(cls, clip_name, t5_name, type="flux1") -> io.NodeOutput:
        clip_path = folder_paths.get_full_path_or_raise(TEXT_ENCODER_FOLDER, clip_name)
        t5_path = None if t5_name == NO_T5 else folder_paths.get_full_path_or_raise(TEXT_ENCODER_FOLDER, t5_name)
        return io.NodeOutput(load_text_encoders(clip_path, t5_path, type))


NODES = [FluxQLoadGGUF, FluxQLoadTextEncodersGGUF]
