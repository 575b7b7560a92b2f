"""The pack's exceptions read as `fluxq.<Name>` wherever their type is shown (ComfyUI's error
dialog title is the type's module and name; the pack's import path there is its folder path)."""

from __future__ import annotations

import importlib
import pkgutil

import lora_ops


def test_no_exception_of_lora_ops_carries_its_import_path():
    found = {}
    for module_info in pkgutil.iter_modules(lora_ops.__path__):
        module = importlib.import_module(f"lora_ops.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException):
                found[value.__qualname__] = value.__module__
    assert {"DatasetError", "CheckpointError", "GGUFFormatError", "LoraFormatError"} <= found.keys()
    leaked = {name: module for name, module in found.items() if module.startswith("lora_ops")}
    assert not leaked
    assert found["DatasetError"] == "fluxq"
