"""The LoRA workbench: merge, resize and extract LoRAs, and bake a MODEL as applied into a GGUF.
The math and the file writing live in lora_ops (lora_tools, gguf_write, ggml_quants)."""

import os

import folder_paths
from comfy_api.latest import io

from ..lora_ops import lora_tools as tools
from ..lora_ops.ggml_quants import TARGET_NAMES, QuantizeError, target_type
from ..lora_ops.gguf_write import published_flux_qtype, write_gguf_stream
from ..lora_ops.model_weights import open_weights
from .comfy_glue import (
    AppliedWeights,
    check_file_choice,
    checked_file_name,
    load_flux_gguf,
    lora_layers,
    progress_bar,
    save_path,
    show_progress_text,
)

CATEGORY = "Flux QLoRA Lab/workbench"
NONE = "none"
MAX_RANK = 3072  # FLUX's hidden size: no FLUX layer's update has a higher rank
SAVE_DTYPES = tuple(tools.SAVE_DTYPES)
MERGE_MODES = ("exact (concatenate ranks)", "to rank (SVD)")
RESIZE_MODES = ("fixed rank", "kept fraction (kohya sv_fro)")
MODEL_FILES = "fluxq_workbench_models"
# Both GGUF and float checkpoints of the diffusion_models folders, for extraction.
folder_paths.folder_names_and_paths[MODEL_FILES] = (
    folder_paths.folder_names_and_paths["diffusion_models"][0], {".gguf", ".safetensors", ".sft"}
)


def _save_inputs(default_name: str):
    return [
        io.String.Input("save_name", default=default_name, tooltip="File name in models/loras (no folders)."),
        io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bfloat16",
                       tooltip="Precision of the written factors."),
        io.Boolean.Input("overwrite", default=False,
                         tooltip="Replace a file of that name. Off: an existing file stops the node."),
    ]


def _write(factors, results, save_name, save_dtype, overwrite, operation, **details) -> tuple[str, str]:
    """Writes the LoRA; (file name, report)."""
    name = checked_file_name(save_name, ".safetensors", "save_name")
    tools.write_lora(save_path("loras", name), factors, tools.SAVE_DTYPES[save_dtype], overwrite,
                     tools.tool_metadata(operation, **details))
    return name, f"{name}: {tools.summary(results)}"


def _output(name: str, report: str, node_id) -> io.NodeOutput:
    show_progress_text(report, node_id)
    return io.NodeOutput(name, report, ui={"text": [report]})


def _outputs():
    return [io.String.Output(display_name="lora_file", tooltip="Saved file name in models/loras."),
            io.String.Output(display_name="report", tooltip="Ranks and per-layer relative errors.")]


class FluxQMergeLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        lora_names = folder_paths.get_filename_list("loras")
        slots = []
        for i in range(1, 5):
            slots += [
                io.Combo.Input(f"lora_{i}", options=lora_names if i == 1 else [NONE, *lora_names],
                               **({} if i == 1 else {"default": NONE}),
                               tooltip=f"LoRA {i} (any format Apply LoRA reads)."),
                io.Float.Input(f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=f"Weight of LoRA {i} in the sum."),
            ]
        return io.Schema(
            node_id="FluxQMergeLoRAs",
            display_name="Merge LoRAs (FluxQ)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes one LoRA equal to the weighted sum of up to four. 'exact' concatenates the ranks "
                        "(the file applies exactly like the LoRAs stacked at those strengths); 'to rank' keeps the "
                        "best rank-r approximation of each layer's summed update (SVD) and reports its relative "
                        "error. The MODEL maps the files' keys (as Apply LoRA does); it is not changed.",
            inputs=[io.Model.Input("model"), *slots,
                    io.Combo.Input("mode", options=list(MERGE_MODES), default=MERGE_MODES[0]),
                    io.Int.Input("rank", default=32, min=1, max=MAX_RANK, tooltip="Rank per layer for 'to rank'."),
                    *_save_inputs("merged_lora")],
            outputs=_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, lora_1, lora_2, lora_3, lora_4):
        for i, name in enumerate((lora_1, lora_2, lora_3, lora_4), start=1):
            checked = check_file_choice("loras", f"lora_{i}", name, () if i == 1 else (NONE,))
            if checked is not True:
                return checked
        return True

    @classmethod
    def execute(cls, model, lora_1, weight_1, lora_2, weight_2, lora_3, weight_3, lora_4, weight_4, mode, rank,
                save_name, save_dtype, overwrite) -> io.NodeOutput:
        chosen = [(n, w) for n, w in ((lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3),
                                      (lora_4, weight_4)) if n != NONE]
        layers, shapes, loaded = lora_layers(model, chosen)
        rule = None if mode == MERGE_MODES[0] else tools.RankRule(rank)
        factors, results = tools.merge_layers(layers, shapes, rule)
        name, report = _write(factors, results, save_name, save_dtype, overwrite, "merge",
                              loras=chosen, mode=mode, rank=rank if rule else None)
        return _output(name, "\n".join([report, *loaded]), cls.hidden.unique_id)


class FluxQResizeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQResizeLoRA",
            display_name="Resize LoRA (FluxQ)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes a lower-rank copy of a LoRA: per layer the best approximation (SVD) at a fixed "
                        "rank, or with the fewest ranks keeping a fraction of the update's Frobenius norm (kohya "
                        "resize_lora's sv_fro), at most `rank`. Reports each layer's relative error.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                    io.Combo.Input("mode", options=list(RESIZE_MODES), default=RESIZE_MODES[0]),
                    io.Int.Input("rank", default=16, min=1, max=MAX_RANK,
                                 tooltip="The rank ('fixed rank'), or the most ranks ('kept fraction')."),
                    io.Float.Input("kept_fraction", default=0.9, min=0.01, max=1.0, step=0.01,
                                   tooltip="For 'kept fraction': the share of each layer's update norm to keep."),
                    *_save_inputs("resized_lora")],
            outputs=_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, lora_name):
        return check_file_choice("loras", "lora_name", lora_name)

    @classmethod
    def execute(cls, model, lora_name, mode, rank, kept_fraction, save_name, save_dtype, overwrite) -> io.NodeOutput:
        layers, shapes, loaded = lora_layers(model, [(lora_name, 1.0)])
        rule = tools.RankRule(rank, kept_fraction if mode == RESIZE_MODES[1] else None)
        factors, results = tools.merge_layers(layers, shapes, rule)
        name, report = _write(factors, results, save_name, save_dtype, overwrite, "resize",
                              lora=lora_name, mode=mode, rank=rank, kept_fraction=rule.kept_fraction)
        return _output(name, "\n".join([report, *loaded]), cls.hidden.unique_id)


class FluxQExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list(MODEL_FILES)
        return io.Schema(
            node_id="FluxQExtractLoRA",
            display_name="Extract LoRA (FluxQ)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes a LoRA approximating fine-tuned minus base on every linear layer (SVD per layer, "
                        "read one layer at a time). Either model may be a GGUF or a float .safetensors of the same "
                        "family. Biases and norms that differ are listed: a LoRA cannot carry them.",
            inputs=[io.Combo.Input("base_model", options=files, tooltip="The base, from models/diffusion_models."),
                    io.Combo.Input("tuned_model", options=files, tooltip="The fine-tune of that base."),
                    io.Int.Input("rank", default=32, min=1, max=MAX_RANK, tooltip="Rank per layer (the most, with a "
                                 "kept fraction below 1)."),
                    io.Float.Input("kept_fraction", default=1.0, min=0.01, max=1.0, step=0.01,
                                   tooltip="Below 1: per layer the fewest ranks keeping this share of the update's "
                                           "norm (kohya sv_fro), at most `rank`."),
                    *_save_inputs("extracted_lora")],
            outputs=_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, base_model, tuned_model):
        for input_name, value in (("base_model", base_model), ("tuned_model", tuned_model)):
            checked = check_file_choice(MODEL_FILES, input_name, value)
            if checked is not True:
                return checked
        return True

    @classmethod
    def execute(cls, base_model, tuned_model, rank, kept_fraction, save_name, save_dtype, overwrite) -> io.NodeOutput:
        base = open_weights(folder_paths.get_full_path_or_raise(MODEL_FILES, base_model))
        tuned = open_weights(folder_paths.get_full_path_or_raise(MODEL_FILES, tuned_model))
        bar = progress_bar(len(base.names()), cls.hidden.unique_id)
        rule = tools.RankRule(rank, kept_fraction if kept_fraction < 1.0 else None)
        factors, results, differing = tools.extract_lora(base, tuned, rule,
                                                         progress=lambda i, n, _: bar.update_absolute(i, n))
        name, report = _write(factors, results, save_name, save_dtype, overwrite, "extract",
                              base=base_model, tuned=tuned_model, rank=rank, kept_fraction=rule.kept_fraction)
        if differing:
            report += (f"\nnot in the LoRA ({len(differing)} non-matrix tensors differ): {', '.join(differing[:6])}"
                       + (" ..." if len(differing) > 6 else ""))
        return _output(name, report, cls.hidden.unique_id)


class FluxQSaveGGUF(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQSaveGGUF",
            display_name="Save model as GGUF (FluxQ bake)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes the MODEL as sampling applies it (GGUF or float base, core LoRA patches, runtime "
                        "LoRAs at their strengths) as a GGUF in models/diffusion_models: no per-step LoRA cost, one "
                        "file to share. Per-tensor types as the published FLUX GGUFs: 1-D and small tensors F32, "
                        "input/output layers and Chroma's approximator F16 (BF16 in a BF16 file), the rest the "
                        "chosen type. K-quants use ggml's reference quantizer (PyPI libggml-python). Streams tensor "
                        "by tensor; a disk without room for the file stops it before any tensor is quantized.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("gguf_type", options=list(TARGET_NAMES), default="Q8_0",
                                   tooltip="Type of the transformer blocks' matrices."),
                    io.String.Input("save_name", default="flux_baked",
                                    tooltip="File name in models/diffusion_models (no folders)."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace a file of that name. Off: an existing file stops the node.")],
            outputs=[io.Model.Output(display_name="baked_model",
                                     tooltip="The written file, loaded as 'Load FLUX GGUF' loads it (dequant "
                                             "auto, resident auto): sample it beside the input MODEL to compare."),
                     io.String.Output(display_name="gguf_file", tooltip="Saved file name in models/diffusion_models."),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, gguf_type):
        # ComfyUI 0.3.75 does not check V3 combo values (0.33 does, with its own message)
        return True if gguf_type in TARGET_NAMES else f"gguf_type: {QuantizeError.unknown(gguf_type)}"

    @classmethod
    def execute(cls, model, gguf_type, save_name, overwrite) -> io.NodeOutput:
        qtype = target_type(gguf_type)
        name = checked_file_name(save_name, ".gguf", "save_name")
        path = save_path("diffusion_models", name)
        if os.path.exists(path) and not overwrite:  # before the model is loaded for reading
            raise FileExistsError(f"{path} exists; choose another save_name or turn overwrite on")
        bar = progress_bar(1, cls.hidden.unique_id)
        report = bake(model, path, qtype, overwrite, progress=lambda i, n, _: bar.update_absolute(i, n))
        show_progress_text(report, cls.hidden.unique_id)
        return io.NodeOutput(load_flux_gguf(path), name, report, ui={"text": [report]})


def bake(model, path: str, qtype, overwrite: bool, progress=None) -> str:
    """Write `model` as applied to the GGUF `path`, calling `progress(done, total, tensor name)`;
    returns a one-line report. The node and scripts/fluxq_quantize.py share it."""
    weights = AppliedWeights(model)
    shapes = [(n, weights.shape(n)) for n in weights.names()]
    types = write_gguf_stream(path, shapes, lambda n: weights.tensor(n).numpy(), published_flux_qtype(qtype), qtype,
                              overwrite=overwrite, progress=progress)
    counts = {}
    for t in types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    loras = ", ".join(f"{e.name} at {e.strength:g}"
                      + ("" if e.block_weights is None else f" (block weights {e.block_weights.describe()})")
                      for e in weights.stack.entries) or "no runtime LoRA"
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"{os.path.basename(path)}: {len(types)} tensors ({kinds}), {os.path.getsize(path) / 2**20:.1f} MiB; {loras}"


NODES = [FluxQMergeLoRAs, FluxQResizeLoRA, FluxQExtractLoRA, FluxQSaveGGUF]
