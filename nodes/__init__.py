"""Thin ComfyUI V3 node classes; the work happens in lora_ops and comfy_glue."""

from .loaders import NODES as _LOADERS

ALL_NODES = [*_LOADERS]
