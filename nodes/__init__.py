"""Thin ComfyUI V3 node classes; the work happens in lora_ops and comfy_glue."""

from .loaders import NODES as _LOADERS
from .lora import NODES as _LORA
from .prepare import NODES as _PREPARE
from .sampling import NODES as _SAMPLING
from .train import NODES as _TRAIN
from .workbench import NODES as _WORKBENCH

ALL_NODES = [*_LOADERS, *_LORA, *_SAMPLING, *_TRAIN, *_PREPARE, *_WORKBENCH]
