"""Flux QLoRA Lab: quantized (GGUF) FLUX.1 with runtime LoRAs, A/B compare grids and a QLoRA trainer."""

from comfy_api.latest import ComfyExtension, io

WEB_DIRECTORY = "./js"


class FluxQLoraLab(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import ALL_NODES

        return ALL_NODES


async def comfy_entrypoint() -> FluxQLoraLab:
    return FluxQLoraLab()
