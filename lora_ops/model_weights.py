"""A diffusion model's weights read one tensor at a time, from a GGUF or a float .safetensors.

Both are memory-mapped: `tensor(name)` reads (and for GGUF dequantizes) that tensor only, so a
caller that walks the names holds one tensor at a time (extraction, baking).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import safetensors
import torch

from .dequant import dequantize
from .errors import user_facing
from .gguf_file import FLUX_PREFIX, GGUFFormatError, QTensor, read_gguf


@user_facing
class ModelWeightsError(ValueError):
    """A model file that cannot be read as weights; the message names the file."""


class WeightSource(Protocol):
    """Named float weights, read on demand."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def stored(self, name: str) -> tuple[str, torch.Tensor]:
        """(storage type, the tensor as stored, not converted): equal pairs are equal weights."""
        ...


def stored_equal(a: WeightSource, b: WeightSource, name: str) -> bool:
    """Whether `name` is stored alike in both (same type, same bytes): equal without dequantizing.
    False says nothing (one value can be stored two ways)."""
    (kind_a, data_a), (kind_b, data_b) = a.stored(name), b.stored(name)
    return kind_a == kind_b and data_a.shape == data_b.shape and torch.equal(data_a, data_b)


@dataclass
class GGUFWeights:
    path: str
    tensors: dict[str, QTensor]

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if not t.is_quantized:  # a copy: an F32 tensor would otherwise be a view of the read-only map
            return t.data.reshape(t.shape).to(torch.float32, copy=True)
        return dequantize(t.data, t.qtype, t.shape, torch.float32)

    def stored(self, name: str) -> tuple[str, torch.Tensor]:
        t = self.tensors[name]
        return t.qtype.name, t.data


class SafetensorsWeights:
    """A float checkpoint; ComfyUI's `model.diffusion_model.` prefix is dropped from the names.
    Only floating-point tensors are weights (a checkpoint may hold integer buffers)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = safetensors.safe_open(path, framework="pt")
            keys = list(self._file.keys())
            self._names: dict[str, str] = {}
            self._shapes: dict[str, tuple[int, ...]] = {}
            for key in keys:
                sliced = self._file.get_slice(key)
                if sliced.get_dtype() not in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"):
                    continue
                name = key.removeprefix(FLUX_PREFIX)
                if name in self._names:
                    raise ModelWeightsError(f"{path}: tensor {name!r} appears with and without {FLUX_PREFIX!r}")
                self._names[name] = key
                self._shapes[name] = tuple(int(d) for d in sliced.get_shape())
        except safetensors.SafetensorError as error:
            raise ModelWeightsError(f"{path}: not a readable safetensors file: {error}") from None
        if not self._names:
            raise ModelWeightsError(f"{path}: holds no floating-point tensors")

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(self._names[name]).to(torch.float32)
        except safetensors.SafetensorError as error:
            raise ModelWeightsError(f"{self.path}: tensor {name!r} cannot be read: {error}") from None

    def stored(self, name: str) -> tuple[str, torch.Tensor]:
        try:
            data = self._file.get_tensor(self._names[name])
        except safetensors.SafetensorError as error:
            raise ModelWeightsError(f"{self.path}: tensor {name!r} cannot be read: {error}") from None
        return str(data.dtype), data


def open_weights(path: str | os.PathLike[str]) -> WeightSource:
    """A .gguf (any architecture; FLUX names lose `model.diffusion_model.`) or a float .safetensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelWeightsError(f"{path}: no such file")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic == b"GGUF":
        try:
            return GGUFWeights(path, read_gguf(path).tensors)
        except GGUFFormatError as error:
            raise ModelWeightsError(str(error)) from None
    if path.lower().endswith((".safetensors", ".sft")):
        return SafetensorsWeights(path)
    raise ModelWeightsError(f"{path}: neither a GGUF file nor a .safetensors checkpoint (pickled checkpoints "
                            "are refused: unpickling can run arbitrary code)")
