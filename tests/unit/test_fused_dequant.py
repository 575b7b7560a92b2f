"""Fused dequantization kernels (lora_ops.fused_dequant) against their eager selves and gguf.

On the CPU the kernels are opt-in (FLUXQ_FUSED_DEQUANT=on): inductor builds them with the system
C++ compiler, a few seconds each, so this file builds as few as the oracles need (one per type).
"""

import logging

import gguf
import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from test_dequant import random_valid_blocks
from torch._inductor import metrics

from lora_ops import fused_dequant
from lora_ops.gguf_write import encode
from lora_ops.qlinear import (
    _eager_weight,
    dequantize_weight,
    gemv,
    quantized_linear,
    repack,
)

# force_disable_caches (the no-compiler test) makes dynamo warn once, in whichever test runs next
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")


def _cxx_found() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor's InvalidCxxCompiler and whatever its search raises
        return False
    return True


# Without a C++ compiler the pack falls back to eager (tested below); its kernels cannot be built.
needs_cxx = pytest.mark.skipif(not _cxx_found(), reason="no C++ compiler for inductor's CPU kernels")

ROWS, COLS = 8, 512  # two K-quant super-blocks per row: small, so each build stays short
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch):
    monkeypatch.setenv(fused_dequant.MODE_ENV, "on")
    fused_dequant.reset()
    yield
    fused_dequant.reset()


def _hostile(qtype: QType, seed: int = 0):
    """Packed bytes and layout of valid blocks with any finite fp16 scales (subnormals, 65504, -0),
    plus gguf's float32 dequantization of them."""
    n_blocks = ROWS * COLS // gguf.GGML_QUANT_SIZES[qtype][0]
    raw = random_valid_blocks(qtype, n_blocks, seed)
    reference = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype)).reshape(ROWS, COLS))
    data, layout = repack(torch.from_numpy(raw.reshape(-1).copy()), qtype)
    return data, layout, reference


def _graphs() -> int:
    """Graphs dynamo has compiled in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# bf16 is what a GPU computes in (the default fused path); float32, the CPU's compute dtype, leaves
# no rounding to hide a reordered or contracted (FMA) operation: the K-quants, whose formula
# d·sc·q − dmin·m has most room for one, are checked there.
@needs_cxx
@pytest.mark.parametrize("qtype, dtype", [
    (QType.Q8_0, torch.bfloat16), (QType.Q4_0, torch.bfloat16), (QType.Q4_K, torch.float32),
    (QType.Q5_K, torch.float32), (QType.Q6_K, torch.float32),
], ids=lambda v: getattr(v, "name", str(v).replace("torch.", "")))
def test_one_kernel_bit_exact_against_eager_and_gguf(qtype, dtype):
    data, layout, reference = _hostile(qtype)
    metrics.reset()
    graphs = _graphs()
    with torch.inference_mode():  # as ComfyUI samples
        fused = dequantize_weight(data, qtype, (ROWS, COLS), layout, dtype)
    assert len(fused_dequant.stats()["build_seconds"]) == 1 and not fused_dequant.stats()["failed"]
    # One kernel reads the bytes and writes the weight: nothing in between is materialised.
    assert metrics.generated_kernel_count == 1
    eager = _eager_weight(data, qtype, (ROWS, COLS), layout, dtype)
    assert fused.dtype == dtype and fused.shape == (ROWS, COLS)
    assert torch.equal(fused, eager)
    # gguf's numpy dequantization: as close as the eager path is (tests/unit/test_dequant.py), then rounded
    torch.testing.assert_close(fused.float(), reference.to(dtype).float(), rtol=1e-6 if dtype == torch.float32 else 2 ** -8, atol=0)
    with torch.inference_mode():  # the same key again: the same kernel
        assert torch.equal(dequantize_weight(data, qtype, (ROWS, COLS), layout, dtype), eager)
    assert _graphs() - graphs == 1


@needs_cxx
def test_gemv_kernel_never_writes_the_weight_and_matches_within_summation_error():
    qtype = QType.Q8_0  # its repacked layout: FLUX's modulations in a Q8_0 file (the others' is covered above)
    rng = np.random.default_rng(3)
    raw = encode(rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05, qtype, rng)
    weight = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype)).reshape(ROWS, COLS))
    data, layout = repack(torch.from_numpy(raw.reshape(-1).view(np.uint8).copy()), qtype)
    x = torch.randn(1, 1, COLS, generator=torch.Generator().manual_seed(2))
    metrics.reset()
    with torch.inference_mode():
        y = gemv(x, data, qtype, (ROWS, COLS), layout)
    assert len(fused_dequant.stats()["build_seconds"]) == 1
    assert metrics.generated_kernel_count == 1  # dequantization inside the row reduction
    reference = F.linear(x.double(), weight.double())
    bound = COLS * EPS32 * F.linear(x.abs().double(), weight.abs().double())
    assert ((y.double() - reference).abs() <= bound).all()
    # The plan's entry point takes it too (one token, no LoRA: GEMV)
    with torch.inference_mode():
        assert torch.equal(quantized_linear(x, data, qtype, (ROWS, COLS), layout, None), y)
    # An input that needs a gradient keeps the eager path (the kernel runs without autograd)
    y_grad = gemv(x.clone().requires_grad_(True), data, qtype, (ROWS, COLS), layout)
    assert y_grad.requires_grad and len(fused_dequant.stats()["build_seconds"]) == 1


def _double(t: torch.Tensor) -> torch.Tensor:
    """A trivial function for the tests of ``run`` itself: each build takes a fraction of a dequantizer's."""
    return t * 2


@pytest.fixture
def no_cxx_build(monkeypatch):
    monkeypatch.setattr(fused_dequant, "BACKEND", "eager")


def test_compile_time_is_logged_once_not_per_kernel(caplog, no_cxx_build):
    x = torch.arange(8.0)
    with caplog.at_level(logging.DEBUG, logger="fluxq"):
        for key in (("first",), ("second",)):
            for _ in range(2):
                assert torch.equal(fused_dequant.run(_double, key, x.device, x), x * 2)
    infos = [r for r in caplog.records if r.levelno >= logging.INFO and "fused dequantization" in r.getMessage()]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG and "compiled in" in r.getMessage()]
    assert len(infos) == 1 and "first kernel (fluxq_fused_first_cpu)" in infos[0].getMessage()
    assert "FLUXQ_FUSED_DEQUANT=off" in infos[0].getMessage()
    assert len(debugs) == 1 and "fluxq_fused_second_cpu" in debugs[0].getMessage()
    assert set(fused_dequant.stats()["build_seconds"]) == {("first", "cpu"), ("second", "cpu")}


def test_a_key_compiles_once_per_autograd_mode(no_cxx_build):
    # dynamo guards on the mode: ComfyUI samples in inference mode, the trainer outside it; each
    # builds a key once (the kernel always runs without autograd: the bytes have no gradient).
    x = torch.arange(8.0)
    graphs = _graphs()
    for _ in range(2):
        with torch.inference_mode():
            fused_dequant.run(_double, ("modes",), x.device, x)
    assert _graphs() - graphs == 1
    for _ in range(2):
        out = fused_dequant.run(_double, ("modes",), x.device, x.requires_grad_(True))
        assert not out.requires_grad
    assert _graphs() - graphs == 2


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_cpu_stays_eager_unless_asked(monkeypatch, mode):
    # auto fuses CUDA tensors only: on the CPU every build costs seconds of C++ compilation
    monkeypatch.setenv(fused_dequant.MODE_ENV, mode)
    data, layout, _ = _hostile(QType.Q4_K)
    out = dequantize_weight(data, QType.Q4_K, (ROWS, COLS), layout, torch.float32)
    assert torch.equal(out, _eager_weight(data, QType.Q4_K, (ROWS, COLS), layout, torch.float32))
    assert fused_dequant.stats()["kernels"] == 0


def test_a_bad_mode_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(fused_dequant.MODE_ENV, "yes")
    data, layout, _ = _hostile(QType.Q8_0)
    with pytest.raises(fused_dequant.FusedModeError, match="FLUXQ_FUSED_DEQUANT='yes'.*auto, on, off"):
        dequantize_weight(data, QType.Q8_0, (ROWS, COLS), layout, torch.float32)


def test_no_compiler_falls_back_to_eager_and_says_so_once(caplog):
    # What a machine without a C++ compiler (CPU) or without Triton (CUDA) meets: the build fails.
    # inductor's own patch(): monkeypatch's undo deletes a config it cannot restore by value, which
    # hides it from every later compile in the process.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/fluxq-no-cxx",),
                                "force_disable_caches": True}):  # a cached kernel needs no compiler
        _fall_back_without_a_compiler(caplog)


def _fall_back_without_a_compiler(caplog):
    data, layout, _ = _hostile(QType.Q4_0)
    eager = _eager_weight(data, QType.Q4_0, (ROWS, COLS), layout, torch.float32)
    x = torch.arange(8.0)
    with caplog.at_level(logging.WARNING, logger="fluxq"):
        # the build that fails (a trivial function: the failure, not the lowering, is under test)
        assert fused_dequant.run(_double, ("no-cxx",), x.device, x) is None
        # later calls on that device type run eagerly without trying again
        for _ in range(2):
            assert torch.equal(dequantize_weight(data, QType.Q4_0, (ROWS, COLS), layout, torch.float32), eager)
    assert fused_dequant.stats()["kernels"] == 1
    failed = fused_dequant.stats()["failed"]
    assert list(failed) == ["cpu"] and "compiler" in failed["cpu"].lower()
    warnings = [r.getMessage() for r in caplog.records if "fused dequantization is off" in r.getMessage()]
    assert len(warnings) == 1 and "eager kernels instead" in warnings[0]
    assert not fused_dequant.enabled_for(torch.device("cpu"))


def test_inside_a_compiled_graph_the_eager_code_is_inlined():
    # Under core's TorchCompileModel the outer graph fuses dequantization itself: no nested kernel,
    # no graph break (fullgraph), even with fusing switched on.
    data, layout, _ = _hostile(QType.Q8_0)
    compiled = torch.compile(lambda d: dequantize_weight(d, QType.Q8_0, (ROWS, COLS), layout, torch.float32),
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(data), _eager_weight(data, QType.Q8_0, (ROWS, COLS), layout, torch.float32))
    assert fused_dequant.stats()["kernels"] == 0
