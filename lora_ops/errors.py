"""The name users read on the pack's exceptions.

ComfyUI titles its error dialog with the exception type's module and name
(`execution.full_type_name`), and it imports a custom node pack under the pack's folder path with
its dots replaced, so a pack exception read like
`/home/me/ComfyUI/custom_nodes/comfyui-flux-qlora.lora_ops.dataset.DatasetError`. A class marked
`user_facing` reads `fluxq.DatasetError` (nothing pickles these exceptions, so the module name is
only ever read by people).
"""

from __future__ import annotations

PUBLIC_MODULE = "fluxq"


def user_facing(cls: type) -> type:
    cls.__module__ = PUBLIC_MODULE
    return cls
