"""Writing real models as GGUF: quantizers against gguf's reference dequantizer, the published
FLUX per-tensor type policy, the streamed writer (bounded memory, atomic, no overwrite)."""

import errno
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from lora_ops.atomic import DiskFullError
from lora_ops.dequant import dequantize, quantized_nbytes
from lora_ops.ggml_quants import (
    K_QUANT_TYPES,
    TARGET_TYPES,
    QuantizeError,
    k_quants_available,
    quantize,
    target_type,
)
from lora_ops.gguf_file import read_gguf
from lora_ops.gguf_write import published_flux_qtype, write_gguf_stream

# Upper bounds of the relative RMS error of each type on Gaussian weights (measured: Q8_0 0.005,
# Q6_K 0.018, Q5_K 0.036, Q4_K 0.071, Q3_K 0.15, Q2_K 0.30), about 1.5x, so a broken quantizer fails.
ERROR_BOUND = {
    QType.F16: 1e-3, QType.BF16: 5e-3, QType.Q8_0: 8e-3, QType.Q5_1: 6e-2, QType.Q5_0: 6e-2,
    QType.Q4_1: 0.12, QType.Q4_0: 0.13, QType.Q6_K: 0.03, QType.Q5_K: 0.055, QType.Q4_K: 0.11,
    QType.Q3_K: 0.23, QType.Q2_K: 0.45,
}  # fmt: skip


def weights(shape=(32, 512), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_k_quants_are_available():
    assert k_quants_available() is None  # libggml-python is a dependency of the pack


@pytest.mark.parametrize("qtype", TARGET_TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_dequantize(qtype):
    x = weights()
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    reference = gguf.quants.dequantize(raw, qtype)
    error = np.linalg.norm(reference - x) / np.linalg.norm(x)
    assert error < ERROR_BOUND[qtype]
    # the pack's own dequantizer reads the same values back
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, x.shape).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    if qtype not in K_QUANT_TYPES:  # the legacy types are gguf's own quantizer, byte for byte
        assert np.array_equal(raw.reshape(-1), gguf.quants.quantize(x, qtype).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("qtype", K_QUANT_TYPES, ids=lambda t: t.name)
def test_k_quants_reproduce_their_own_dequantization(qtype):
    """Values ggml's quantizer produced come back nearly unchanged (Q3_K's scale search moves a few)."""
    once = gguf.quants.dequantize(quantize(weights(), qtype), qtype)
    twice = gguf.quants.dequantize(quantize(once, qtype), qtype)
    assert np.linalg.norm(twice - once) / np.linalg.norm(once) < 0.25 * ERROR_BOUND[qtype]


def test_unknown_and_unfit_types_are_refused():
    with pytest.raises(QuantizeError, match="'Q4_K_M'.*Q8_0"):
        target_type("Q4_K_M")
    with pytest.raises(QuantizeError, match="100 values.*Q4_K blocks of 256"):
        quantize(weights((4, 100)), QType.Q4_K)
    assert target_type("Q5_K") == QType.Q5_K


def test_published_flux_policy():
    rule = published_flux_qtype(QType.Q4_K)
    assert rule("double_blocks.0.img_attn.qkv.weight", (9216, 3072)) == QType.Q4_K
    assert rule("single_blocks.0.linear1.weight", (21504, 3072)) == QType.Q4_K
    assert rule("double_blocks.0.img_attn.qkv.bias", (9216,)) == QType.F32
    assert rule("double_blocks.0.img_attn.norm.key_norm.scale", (128,)) == QType.F32
    assert rule("img_in.weight", (3072, 64)) == QType.F16
    assert rule("final_layer.linear.weight", (64, 3072)) == QType.F16
    assert rule("time_in.in_layer.weight", (3072, 256)) == QType.F16
    assert rule("double_blocks.0.tiny.weight", (8, 128)) == QType.F32  # <= 1024 values
    assert rule("double_blocks.0.odd.weight", (64, 100)) == QType.F16  # rows not in whole blocks
    assert published_flux_qtype(QType.BF16)("img_in.weight", (3072, 64)) == QType.BF16


TENSORS = {
    "img_in.weight": (64, 32),
    "img_in.bias": (64,),
    "double_blocks.0.img_attn.qkv.weight": (96, 256),
    "single_blocks.0.linear2.weight": (32, 512),
}


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K], ids=lambda t: t.name)
def test_streamed_file_reads_back_in_the_pack(tmp_path, qtype):
    values = {name: weights(shape, seed=i) for i, (name, shape) in enumerate(TENSORS.items())}
    loaded, progress = [], []

    def load(name):
        loaded.append(name)
        return values[name]

    path = tmp_path / "baked.gguf"
    types = write_gguf_stream(path, list(TENSORS.items()), load, published_flux_qtype(qtype), qtype,
                              progress=lambda i, n, name: progress.append((i, n, name)))
    assert loaded == list(TENSORS) and progress[-1] == (4, 4, "single_blocks.0.linear2.weight")
    model = read_gguf(path, expected_arch="flux")
    assert model.metadata["general.file_type"] == {QType.Q8_0: 7, QType.Q4_K: 14}[qtype]  # MOSTLY_Q8_0 / Q4_K_S
    assert model.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    for name, tensor in model.tensors.items():
        assert tensor.qtype == types[name] and tensor.shape == TENSORS[name]
        raw = tensor.data if tensor.is_quantized else tensor.data.reshape(-1).view(torch.uint8)
        back = dequantize(raw.reshape(-1), tensor.qtype, tensor.shape).numpy()
        error = np.linalg.norm(back - values[name]) / np.linalg.norm(values[name])
        assert error < ERROR_BOUND.get(tensor.qtype, 1e-6), name
    assert types["double_blocks.0.img_attn.qkv.weight"] == qtype and types["img_in.bias"] == QType.F32


def test_existing_file_is_refused_and_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"user data")
    shapes = list(TENSORS.items())
    with pytest.raises(FileExistsError, match="model.gguf"):
        write_gguf_stream(path, shapes, lambda n: weights(TENSORS[n]), published_flux_qtype(QType.Q8_0), QType.Q8_0)
    assert path.read_bytes() == b"user data"

    def failing(name):
        if name.startswith("single_blocks"):
            raise ValueError("the LoRA's layer could not be read")
        return weights(TENSORS[name])

    with pytest.raises(ValueError, match="could not be read"):
        write_gguf_stream(path, shapes, failing, published_flux_qtype(QType.Q8_0), QType.Q8_0, overwrite=True)
    assert path.read_bytes() == b"user data"  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left
    write_gguf_stream(path, shapes, lambda n: weights(TENSORS[n]), published_flux_qtype(QType.Q8_0), QType.Q8_0,
                      overwrite=True)
    assert set(read_gguf(path).tensors) == set(TENSORS)


def test_a_disk_too_small_is_refused_before_any_tensor_is_made(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"user data")
    needed = sum(quantized_nbytes(QType.Q8_0 if "blocks" in n else QType.F16 if len(s) == 2 else QType.F32, s)
                 for n, s in TENSORS.items())
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(1 << 30, 1 << 30, needed - 1))
    loaded = []
    with pytest.raises(DiskFullError, match=rf"model\.gguf: it needs {needed / 2**20:.1f} MiB, "
                                            rf"{(needed - 1) / 2**20:.1f} MiB free.*existing file .* is unchanged"):
        write_gguf_stream(path, list(TENSORS.items()), lambda n: loaded.append(n) or weights(TENSORS[n]),
                          published_flux_qtype(QType.Q8_0), QType.Q8_0, overwrite=True)
    assert loaded == [] and path.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_running_out_of_space_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """The disk fills up after the check (another writer): the system's ENOSPC from the writer
    becomes a DiskFullError naming the file, and the partial file is removed."""
    written = []

    def write_until_full(self, tensor):
        if written:
            self.fout[0].write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor)
        return original(self, tensor)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_until_full)
    path = tmp_path / "baked.gguf"
    with pytest.raises(DiskFullError, match=r"baked\.gguf: [0-9.]+ MiB free in .*nothing was written") as full:
        write_gguf_stream(path, list(TENSORS.items()), lambda n: weights(TENSORS[n]),
                          published_flux_qtype(QType.Q8_0), QType.Q8_0)
    assert full.value.errno == errno.ENOSPC and len(written) == 1
    assert list(tmp_path.iterdir()) == []


# Released shapes (hidden 3072) of what the other family members add to FLUX.1 [dev]'s tensors:
# FLUX.1 Fill's 384-channel img_in, FLUX.2's global modulation and SwiGLU MLPs (klein 4B and dev
# alike: same names), Chroma's approximator. Kontext and Krea have FLUX.1 [dev]'s tensors.
FAMILY_TENSORS = {
    "img_in.weight": ((3072, 384), QType.F16),  # Fill: 64 latent + 320 mask/image channels
    "double_stream_modulation_img.lin.weight": ((18432, 3072), QType.Q4_K),
    "single_stream_modulation.lin.weight": ((9216, 3072), QType.Q4_K),
    "double_blocks.0.img_mlp.0.weight": ((18432, 3072), QType.Q4_K),
    "single_blocks.0.linear1.weight": ((27648, 3072), QType.Q4_K),
    "single_blocks.0.linear2.weight": ((3072, 12288), QType.Q4_K),
    "final_layer.adaLN_modulation.1.weight": ((6144, 3072), QType.F16),
    "distilled_guidance_layer.in_proj.weight": ((5120, 64), QType.F16),
    "distilled_guidance_layer.layers.0.in_layer.weight": ((5120, 5120), QType.F16),
    "distilled_guidance_layer.out_proj.weight": ((3072, 5120), QType.F16),
    "distilled_guidance_layer.norms.0.scale": ((5120,), QType.F32),
    "distilled_guidance_layer.norms.0.weight": ((5120,), QType.F32),  # ComfyUI's name for it
}


@pytest.mark.parametrize("name", FAMILY_TENSORS)
def test_published_policy_on_the_family_members_tensors(name):
    shape, expected = FAMILY_TENSORS[name]
    assert published_flux_qtype(QType.Q4_K)(name, shape) == expected
    if expected == QType.F16:  # the high-precision layers follow the file's float type
        assert published_flux_qtype(QType.BF16)(name, shape) == QType.BF16
