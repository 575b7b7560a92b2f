"""Read GGUF model files into memory-mapped `QTensor`s, refusing malformed or foreign files early.

gguf.GGUFReader trusts the file: a hostile length can make it loop or allocate without bound,
and a truncated file fails with a bare numpy error. So the whole header (counts, metadata,
tensor infos, data ranges) is walked and bounds-checked here first, with only small reads;
GGUFReader then maps the validated file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass, field

import gguf
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from .dequant import SUPPORTED_QTYPES, UnsupportedQuantTypeError, as_qtype, quantized_nbytes
from .errors import user_facing

FLUX_PREFIX = "model.diffusion_model."

_FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, KV count
# Smallest possible encodings, used to reject counts the file size cannot hold.
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MAX_ARRAY_NESTING = 4
_SCALAR_SIZES = {
    VType.UINT8: 1, VType.INT8: 1, VType.BOOL: 1, VType.UINT16: 2, VType.INT16: 2,
    VType.UINT32: 4, VType.INT32: 4, VType.FLOAT32: 4, VType.UINT64: 8, VType.INT64: 8, VType.FLOAT64: 8,
}
_FLOAT_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16})
_IMAGE_ARCHES = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2"})


@user_facing
class GGUFFormatError(ValueError):
    """A file that is not a usable GGUF model; the message names the file and the problem."""


@dataclass
class QTensor:
    """One GGUF tensor. `shape` is in torch order.

    For quantized types `data` is a read-only uint8 view of the file's bytes (memory-mapped,
    never copied); for F32/F16/BF16 it is the float tensor itself, also a view of the file.
    Never write into `data`.
    """

    name: str
    qtype: QType
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in _FLOAT_QTYPES

    def nelement(self) -> int:
        """Logical element count; ComfyUI's loaders size models with ``Tensor.nelement()``."""
        return math.prod(self.shape)


@dataclass
class GGUFModel:
    path: str
    arch: str | None
    tensors: dict[str, QTensor]
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass
class _TensorInfo:
    name: str
    qtype: QType
    shape: tuple[int, ...]  # torch order
    offset: int  # relative to the start of the data section
    nbytes: int


class _HeaderScanner:
    """Walks a GGUF header through an mmap with bounds checks; never reads tensor data."""

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def error(self, problem: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {problem}")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.error(f"file truncated: {what} at byte {self.pos} needs {n} bytes, only {self.size - self.pos} left")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        start = self.take(length, what)
        try:
            return self.buf[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at byte {start} is not valid UTF-8") from None

    def value_type(self, what: str) -> VType:
        raw = self.u32(f"type of {what}")
        try:
            return VType(raw)
        except ValueError:
            raise self.error(f"{what} has unknown value type {raw}") from None

    def skip_value(self, vtype: VType, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == VType.STRING:
            self.string(what)  # decoded: GGUFReader decodes string values without a check
        else:  # ARRAY
            item_type = self.value_type(f"items of {what}")
            count = self.u64(f"length of {what}")
            min_item = _SCALAR_SIZES.get(item_type, 8 if item_type == VType.STRING else 12)
            if count * min_item > self.size - self.pos:
                raise self.error(f"{what} claims {count} items, more than the file can hold")
            if item_type in _SCALAR_SIZES:
                self.take(count * min_item, what)
            elif depth >= _MAX_ARRAY_NESTING:
                raise self.error(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
            else:
                for _ in range(count):
                    self.skip_value(item_type, what, depth + 1)

    def scan(self) -> list[_TensorInfo]:
        """Return the tensor infos, each checked to lie inside the file's data section."""
        if self.size < _FIXED_HEADER.size:
            raise self.error(f"file truncated: {self.size} bytes is shorter than the {_FIXED_HEADER.size}-byte GGUF header")
        magic, version, tensor_count, kv_count = _FIXED_HEADER.unpack_from(self.buf, 0)
        self.pos = _FIXED_HEADER.size
        if magic != b"GGUF":
            raise self.error(f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
        if version not in (2, 3):
            raise self.error(f"unsupported GGUF version {version} (supported: 2, 3; big-endian files are not supported)")
        room = self.size - self.pos
        if tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES > room:
            raise self.error(
                f"header claims {tensor_count} tensors and {kv_count} metadata keys, "
                f"more than a {self.size}-byte file can hold (truncated or corrupt)"
            )
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for index in range(kv_count):
            key = self.string(f"metadata key #{index}")
            vtype = self.value_type(f"metadata {key!r}")
            if key == "general.alignment":
                if vtype != VType.UINT32:
                    raise self.error(f"metadata 'general.alignment' must be UINT32, got {vtype.name}")
                alignment = self.u32("metadata 'general.alignment'")
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.error(f"metadata 'general.alignment' = {alignment} is not a power of two")
            else:
                self.skip_value(vtype, f"metadata {key!r}")
        infos = [self.tensor_info(index) for index in range(tensor_count)]
        data_start = -(-self.pos // alignment) * alignment
        self.check_data_ranges(infos, data_start, alignment)
        return infos

    def tensor_info(self, index: int) -> _TensorInfo:
        name = self.string(f"name of tensor #{index}")
        n_dims = self.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise self.error(f"tensor {name!r} has {n_dims} dimensions (must be 1 to 4)")
        gguf_dims = [self.u64(f"dims of tensor {name!r}") for _ in range(n_dims)]
        type_id = self.u32(f"type of tensor {name!r}")
        offset = self.u64(f"data offset of tensor {name!r}")
        if min(gguf_dims) < 1:
            raise self.error(f"tensor {name!r} has an empty dimension (dims {gguf_dims})")
        try:
            qtype = as_qtype(type_id)
        except UnsupportedQuantTypeError:
            raise self.error(f"tensor {name!r} has unknown quant type id {type_id}") from None
        if qtype not in SUPPORTED_QTYPES:
            raise self.error(f"tensor {name!r} uses quant type {qtype.name}, which this pack cannot dequantize")
        shape = tuple(reversed(gguf_dims))
        try:
            nbytes = quantized_nbytes(qtype, shape)
        except ValueError as exc:
            raise self.error(f"tensor {name!r} of shape {shape}: {exc}") from None
        return _TensorInfo(name, qtype, shape, offset, nbytes)

    def check_data_ranges(self, infos: list[_TensorInfo], data_start: int, alignment: int) -> None:
        names = set()
        ordered = sorted(infos, key=lambda info: info.offset)
        for info, following in zip(ordered, ordered[1:] + [None]):
            if info.name in names:
                raise self.error(f"tensor {info.name!r} appears twice")
            names.add(info.name)
            if info.offset % alignment:
                raise self.error(f"tensor {info.name!r} data offset {info.offset} is not aligned to {alignment} bytes")
            start, end = data_start + info.offset, data_start + info.offset + info.nbytes
            if end > self.size:
                raise self.error(
                    f"tensor {info.name!r} ({info.qtype.name}, shape {info.shape}) needs bytes {start}..{end}, "
                    f"past the end of the {self.size}-byte file (truncated, or size does not match shape and type)"
                )
            if following is not None and info.offset + info.nbytes > following.offset:
                raise self.error(
                    f"tensor {info.name!r} ({info.qtype.name}, shape {info.shape}) needs {info.nbytes} bytes "
                    f"but tensor {following.name!r} starts {following.offset - info.offset} bytes after it "
                    f"(size does not match shape and type)"
                )


def _scan_header(path: str) -> list[_TensorInfo]:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise GGUFFormatError(f"{path}: file is empty")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _HeaderScanner(path, buf, size).scan()


# Array metadata kept: the vocabulary a text encoder's tokenizer is rebuilt from (lora_ops.llm_gguf).
# Other arrays (merges, scores) are large and unused.
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def _metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    metadata = {}
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF.") or not reader_field.types:
            continue
        if reader_field.types[0] == VType.ARRAY and key not in TOKENIZER_ARRAYS:
            continue
        metadata[key] = reader_field.contents()
    return metadata


def _as_torch(data, qtype: QType) -> torch.Tensor:
    # The memmap is opened read-only ('r'); torch warns that it cannot protect such memory from
    # writes. We never write to it. Copy-on-write ('c') would silence the warning but makes the
    # kernel account the whole file as private writable memory, which can fail for 10+ GB models.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(data)
    if qtype == QType.BF16:  # gguf exposes BF16 as raw bytes
        tensor = tensor.view(torch.bfloat16)
    return tensor


def read_gguf(path: str | os.PathLike[str], expected_arch: str | None = None) -> GGUFModel:
    """Read a GGUF file, memory-mapped. Raises GGUFFormatError for malformed or foreign files.

    With `expected_arch`, `general.architecture` must equal it. FLUX files lose the
    `model.diffusion_model.` prefix some converters put on tensor names.
    """
    path = os.fspath(path)
    infos = _scan_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise GGUFFormatError(f"{path}: gguf could not read the file: {exc}") from exc

    metadata = _metadata(reader)
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    if expected_arch is not None and arch != expected_arch:
        found = f"a {arch!r} model" if arch else "a file without general.architecture"
        raise GGUFFormatError(f"{path}: this is {found}, expected a {expected_arch!r} model")

    arrays = {tensor.name: tensor.data for tensor in reader.tensors}
    tensors: dict[str, QTensor] = {}
    for info in infos:
        name = info.name
        if arch == "flux" and name.startswith(FLUX_PREFIX):
            name = name[len(FLUX_PREFIX):]
        if name in tensors:
            raise GGUFFormatError(f"{path}: tensor {name!r} appears twice (with and without {FLUX_PREFIX!r})")
        tensors[name] = QTensor(name, info.qtype, info.shape, _as_torch(arrays[info.name], info.qtype))
    return GGUFModel(path=path, arch=arch, tensors=tensors, metadata=metadata)


# llama.cpp's T5 tensor names -> the names of ComfyUI's T5 (HF transformers layout).
_T5_BLOCK_PARTS = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_T5_TOP_LEVEL = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
}
_T5_ENCODER_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)")


def t5_name_from_llama_cpp(name: str) -> str:
    """ComfyUI's name for a llama.cpp T5 tensor name; other names are returned unchanged."""
    if name in _T5_TOP_LEVEL:
        return _T5_TOP_LEVEL[name]
    match = _T5_ENCODER_BLOCK.fullmatch(name)
    if match and match.group(2) in _T5_BLOCK_PARTS:
        block, part, kind = match.groups()
        return f"encoder.block.{block}.{_T5_BLOCK_PARTS[part]}.{kind}"
    return name


# llama.cpp's T5 metadata -> the fields of ComfyUI's T5 config (comfy/text_encoders/t5_config_xxl.json).
_T5_CONFIG_KEYS = {
    "embedding_length": "d_model",
    "feed_forward_length": "d_ff",
    "block_count": "num_layers",
    "attention.head_count": "num_heads",
    "attention.key_length": "d_kv",
}
_T5_ARCHES = ("t5encoder", "t5")


def read_text_encoder_gguf(path: str | os.PathLike[str]) -> dict[str, QTensor]:
    """Read a T5 or CLIP text encoder GGUF as a state dict with the names ComfyUI expects.

    llama.cpp-style T5 files (`token_embd`, `enc.blk.N...`) are renamed; files already using
    HF names pass through unchanged.
    """
    return read_text_encoder_gguf_with_config(path)[0]


def read_text_encoder_gguf_with_config(path: str | os.PathLike[str]) -> tuple[dict[str, QTensor], dict[str, int]]:
    """``read_text_encoder_gguf`` and, for a llama.cpp T5 file, the T5 config its metadata declares
    (ComfyUI's field names: ``d_model``, ``d_ff``, ``num_layers``, ``num_heads``, ``d_kv``,
    ``vocab_size``); {} for other files. A real T5-XXL file declares T5-XXL's own config."""
    model = read_gguf(path)
    if model.arch in _IMAGE_ARCHES:
        raise GGUFFormatError(f"{model.path}: this is a {model.arch!r} diffusion model, not a text encoder")
    renamed: dict[str, QTensor] = {}
    for name, tensor in model.tensors.items():
        new_name = t5_name_from_llama_cpp(name)
        if new_name in renamed:
            raise GGUFFormatError(f"{model.path}: tensors map onto the same name {new_name!r}")
        renamed[new_name] = QTensor(new_name, tensor.qtype, tensor.shape, tensor.data)
    config = {}
    if model.arch in _T5_ARCHES:
        for key, field_name in _T5_CONFIG_KEYS.items():
            value = model.metadata.get(f"{model.arch}.{key}")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GGUFFormatError(f"{model.path}: metadata '{model.arch}.{key}' must be a positive integer, got {value!r}")
            config[field_name] = value
        if "shared.weight" in renamed and len(renamed["shared.weight"].shape) == 2:
            config["vocab_size"] = renamed["shared.weight"].shape[0]
    return renamed, config
