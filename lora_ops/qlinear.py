"""How a quantized linear computes `y = x·W_effᵀ + b`, with `W_eff = dequant(q) + Σ sᵢ·Δᵢ`.

One plan per layer and call (`select_plan`), chosen from the number of tokens and what the layer
holds:
- ``GEMV`` (one token: FLUX's modulation linears, ~3.2B of 11.9B parameters): a dequantizing
  matrix-vector product over column chunks of the quantized codes; at most ``GEMV_COLUMNS``
  columns of float weight exist at a time, never the whole weight. LoRAs stay a separate
  path there (at one token a low-rank one costs ~rank/out of the layer); adapters that read the
  base weight (DoRA) need it whole, so a layer with one takes DEQUANT instead.
- ``DEQUANT`` (many tokens): dequantize once into a weight in the compute dtype, fold the LoRAs
  into it (Δᵢ = the adapter's ``dense_delta``, every adapter kind; DoRA's from the dequantized
  base rows), then the same ``F.linear`` native runs. Plain
  tensor ops with no host sync, so under ``torch.compile`` inductor fuses dequantize + fold into
  one pointwise kernel that writes the buffer the matmul reads. Plain low-rank adapters are
  folded only where that is the cheaper work (``folds_low_rank``: enough tokens); with fewer
  tokens (small images, the text stream) they stay the separate path. They come as one group
  (``lora_runtime.LayerLoras``: factors concatenated along a dynamic rank), so the traced code does
  not depend on how many there are, their ranks or strengths.
- ``RESIDENT``: a kept dequantized copy with the frozen LoRAs folded in (``Resident``): the layer
  runs exactly like a native float layer.
Adapters that train (gradients must reach A and B) always take the separate path.

Without an outer ``torch.compile``, DEQUANT and GEMV take fused kernels where ``fused_dequant``
allows (CUDA by default): the functions below compiled alone, one kernel per weight, equal to
their eager selves (DEQUANT bit for bit); the eager code runs everywhere else.

Repacking at load (``repack``) is lossless and keeps the byte count: Q8_0 becomes all int8 codes
then all fp16 scales, so the codes are one plain int8 matrix (no per-block byte offsets in the
hot loop); the other types keep GGUF's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf
import torch
from gguf import GGMLQuantizationType as QType

from . import fused_dequant
from .dequant import BLOCK_QTYPES, as_qtype, dequantize, quantized_nbytes
from .lora_runtime import Adapter, LayerLoras, layer_loras

GEMV, DEQUANT, RESIDENT = "gemv", "dequant", "resident"
PLANS = (GEMV, DEQUANT, RESIDENT)

GGUF_LAYOUT = "gguf"  # the file's block layout, as dequant.dequantize reads it
Q8_0_SPLIT = "q8_0_split"  # n int8 codes, then n/32 fp16 scales (same bytes as the file)
_Q8_0_GROUP = 32

# Columns of float weight the GEMV plan forms at a time: a multiple of every block size (32, 256);
# 512 columns of FLUX's widest modulation (18432 rows) are 38 MB in fp32.
GEMV_COLUMNS = 512

Pairs = Sequence[tuple[torch.Tensor, Adapter]]


def as_layer_loras(loras: LayerLoras | Pairs | None, shape: tuple[int, ...]) -> LayerLoras | None:
    """A layer's LoRAs as `LayerLoras` (the form layers get from `activate`); None for none.
    (strength, adapter) pairs are resolved here, cast per call: direct callers and tests."""
    if loras is None or isinstance(loras, LayerLoras):
        return loras
    return layer_loras(loras, math.prod(shape[:-1]), shape[-1]) if loras else None


def repack(raw: torch.Tensor, qtype: int | QType) -> tuple[torch.Tensor, str]:
    """(bytes, layout) to keep for a GGUF tensor: lossless, same byte count as the file."""
    if as_qtype(qtype) != QType.Q8_0:
        return raw, GGUF_LAYOUT
    _, type_size = gguf.GGML_QUANT_SIZES[QType.Q8_0]
    blocks = raw.reshape(-1, type_size)
    n_codes = blocks.shape[0] * _Q8_0_GROUP
    out = torch.empty(raw.numel(), dtype=torch.uint8, device=raw.device)
    out[:n_codes].view(-1, _Q8_0_GROUP).copy_(blocks[:, 2:])
    out[n_codes:].view(-1, 2).copy_(blocks[:, :2])
    return out, Q8_0_SPLIT


def _q8_0_split_views(data: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (rows, cols) and fp16 scales (rows, cols/32) viewing repacked Q8_0 bytes."""
    n_codes = rows * cols
    codes = data[:n_codes].view(torch.int8).reshape(rows, cols)
    scales = data[n_codes:].view(torch.float16).reshape(rows, cols // _Q8_0_GROUP)
    return codes, scales


def _q8_0_columns(codes: torch.Tensor, scales: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """float32 columns start:stop of a split Q8_0 matrix: code times scale, as gguf computes it."""
    rows = codes.shape[0]
    q = codes[:, start:stop].reshape(rows, -1, _Q8_0_GROUP).to(torch.float32)
    d = scales[:, start // _Q8_0_GROUP:stop // _Q8_0_GROUP].to(torch.float32).unsqueeze(-1)
    return (q * d).reshape(rows, stop - start)


def _fusable(data: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> bool:
    """Whether a compiled kernel may take these bytes: a block type with exactly its byte count,
    4-byte aligned. Anything else (float types: one cast already; bad sizes: the eager code's
    errors; unaligned bytes: its copy) stays eager. Never called under torch.compile
    (``storage_offset`` cannot be traced): ``fused_dequant.enabled_for`` is False there."""
    if qtype not in BLOCK_QTYPES or data.dtype != torch.uint8 or not data.is_contiguous() or data.storage_offset() % 4:
        return False
    try:
        return data.numel() == quantized_nbytes(qtype, shape)
    except ValueError:
        return False


def dequantize_weight(data: torch.Tensor, qtype: int | QType, shape: tuple[int, ...], layout: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """The whole float weight, equal to ``gguf.quants.dequantize`` (float32 arithmetic, then dtype):
    by a fused kernel where ``fused_dequant`` allows, else by the eager kernels."""
    qtype, shape = as_qtype(qtype), tuple(shape)
    if fused_dequant.enabled_for(data.device) and _fusable(data, qtype, shape):
        weight = fused_dequant.run(_eager_weight, (DEQUANT, qtype, layout, shape, dtype), data.device,
                                   data, qtype, shape, layout, dtype)
        if weight is not None:
            return weight
    return _eager_weight(data, qtype, shape, layout, dtype)


def _eager_weight(data: torch.Tensor, qtype: QType, shape: tuple[int, ...], layout: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_weight`` in separate eager kernels: the fallback, the oracle, and the function
    the fused kernel is compiled from."""
    if layout == Q8_0_SPLIT:
        rows, cols = math.prod(shape[:-1]), shape[-1]
        codes, scales = _q8_0_split_views(data, rows, cols)
        return _q8_0_columns(codes, scales, 0, cols).reshape(shape).to(dtype)
    return dequantize(data, qtype, shape, dtype)


def _weight_columns(data: torch.Tensor, qtype: QType, shape: tuple[int, int], layout: str):
    """A function (start, stop) -> float32 columns start:stop of the weight, read from the codes."""
    rows, cols = shape
    if layout == Q8_0_SPLIT:
        codes, scales = _q8_0_split_views(data, rows, cols)
        return lambda start, stop: _q8_0_columns(codes, scales, start, stop)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = data.reshape(rows, cols // block_size * type_size)

    def columns(start: int, stop: int) -> torch.Tensor:
        chunk = row_bytes[:, start // block_size * type_size:stop // block_size * type_size].contiguous()
        return dequantize(chunk, qtype, (rows, stop - start), torch.float32)

    return columns


def gemv(x: torch.Tensor, data: torch.Tensor, qtype: int | QType, shape: tuple[int, int], layout: str) -> torch.Tensor:
    """``x @ dequant(q)ᵀ`` for one token, accumulated in float32: by a fused kernel where
    ``fused_dequant`` allows (``_whole_row_gemv``), else eagerly chunk by chunk over the columns.

    Either sums in a different order than one ``F.linear`` over the whole row (chunk partial
    sums, then their sum; the kernel's own reduction order): equal to the reference within
    float32 summation error.
    """
    qtype, shape = as_qtype(qtype), tuple(shape)
    # The kernel runs without autograd (the bytes need none): an x that needs a gradient stays eager.
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if not needs_grad and fused_dequant.enabled_for(x.device) and _fusable(data, qtype, shape):
        y = fused_dequant.run(_whole_row_gemv, (GEMV, qtype, layout, shape, tuple(x.shape), x.dtype), x.device,
                              x, data, qtype, shape, layout)
        if y is not None:
            return y
    rows, cols = shape
    columns = _weight_columns(data, qtype, shape, layout)
    x32 = x.reshape(-1, cols).to(torch.float32)
    y = None
    for start in range(0, cols, GEMV_COLUMNS):
        stop = min(start + GEMV_COLUMNS, cols)
        part = torch.nn.functional.linear(x32[:, start:stop], columns(start, stop))
        y = part if y is None else y + part
    return y.reshape(*x.shape[:-1], rows).to(x.dtype)


def _whole_row_gemv(x: torch.Tensor, data: torch.Tensor, qtype: QType, shape: tuple[int, int],
                    layout: str) -> torch.Tensor:
    """``gemv`` as one expression for the fused kernel: inductor computes each row's dequantized
    values inside the row reduction, so no weight is ever written (eager, this would form the
    whole float32 weight: the chunked loop above is the eager form)."""
    rows, cols = shape
    weight = _eager_weight(data, qtype, shape, layout, torch.float32)
    y = (weight * x.reshape(1, cols).to(torch.float32)).sum(-1)
    return y.reshape(*x.shape[:-1], rows).to(x.dtype)


def fold_(weight: torch.Tensor, loras: LayerLoras | Pairs | None) -> torch.Tensor:
    """Adds ``s·Δ`` of each frozen adapter to its rows of ``weight``, in place and in weight's
    dtype (callers pass a weight they own); rows stay exactly as they were at strength 0
    (``LayerLoras.fold_``)."""
    loras = as_layer_loras(loras, tuple(weight.shape))
    return weight if loras is None else loras.fold_(weight)


def folded_weight(data: torch.Tensor, qtype: int | QType, shape: tuple[int, ...], layout: str,
                  loras: LayerLoras | Pairs | None, dtype: torch.dtype, arith_dtype: torch.dtype | None = None,
                  group: bool = True) -> torch.Tensor:
    """``dequant(q) + Σ s·Δ`` in dtype; dequantization and fold computed in ``arith_dtype`` (default
    dtype); ``group=False`` leaves the low-rank group out (it runs as the separate path)."""
    weight = dequantize_weight(data, qtype, shape, layout, arith_dtype or dtype)
    loras = as_layer_loras(loras, shape)
    return weight.to(dtype) if loras is None else loras.fold_(weight, group).to(dtype)


@dataclass(eq=False)
class Resident:
    """A kept dequantized weight with the frozen adapters of ``key`` folded in."""

    weight: torch.Tensor
    key: tuple

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def build_resident(previous: Resident | None, data: torch.Tensor, qtype: int | QType, shape: tuple[int, ...],
                   layout: str, loras: LayerLoras | Pairs | None, dtype: torch.dtype,
                   arith_dtype: torch.dtype | None = None) -> Resident:
    """The resident copy for ``loras`` (their frozen adapters), rebuilt from the quantized bytes,
    so an emptied stack gives back exactly the base. Reuses ``previous``'s storage when it fits: a
    compiled graph reading it sees the same tensor, only new values."""
    loras = as_layer_loras(loras, shape)
    key = () if loras is None else loras.key
    if previous is not None and previous.key == key and previous.weight.dtype == dtype:
        return previous
    weight = folded_weight(data, qtype, shape, layout, loras, dtype, arith_dtype)
    if previous is not None and previous.weight.shape == weight.shape and previous.weight.dtype == dtype \
            and previous.weight.device == weight.device:
        previous.weight.copy_(weight)
        previous.key = key
        return previous
    return Resident(weight, key)


def folds_low_rank(tokens: int, shape: tuple[int, ...]) -> bool:
    """Whether folding a low-rank adapter costs less than its separate path. Per unit of rank,
    folding does out·in multiply-adds (B·A) plus an add per weight element; the separate path
    tokens·(in + out) (A·x, then B·(Ax)). FLUX.1-dev at 1024² (4096 image tokens) folds every
    linear; at 256² (256) none does (3072×3072 folds from 1536 tokens)."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return tokens * (rows + cols) >= rows * cols


def select_plan(tokens: int, resident_usable: bool, has_weight_patches: bool, needs_grad: bool = False,
                reads_base: bool = False) -> str:
    """The plan for one call. Weight patches (core LoRAs) need the whole float weight: DEQUANT.
    With gradients GEMV is not used: its float32 column chunks would all be kept for backward;
    nor with an adapter that reads the base rows (DoRA): GEMV never forms them."""
    if has_weight_patches:
        return DEQUANT
    if resident_usable:
        return RESIDENT
    return GEMV if tokens == 1 and not needs_grad and not reads_base else DEQUANT


def quantized_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    qtype: int | QType,
    shape: tuple[int, ...],
    layout: str,
    bias: torch.Tensor | None,
    pairs: LayerLoras | Pairs | None = (),
    resident: Resident | None = None,
    weight_patches: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    arith_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x·W_effᵀ + b`` by the selected plan; ``data`` on x's device; ``pairs`` the layer's LoRAs
    (its ``LayerLoras``, or (strength, adapter) pairs); ``weight_patches`` functions applied to the
    dequantized weight. Reads no dict and no host value that a strength change alters: under
    torch.compile the same graph serves every strength and every stack of the same layers."""
    loras = as_layer_loras(pairs, shape)
    resident_usable = (
        resident is not None and resident.weight.dtype == x.dtype and resident.weight.device == x.device
        # Under torch.compile the caller keeps the copy in sync before the call (reading host
        # strength values here would bake them into the graph).
        and (torch.compiler.is_compiling() or resident.key == (() if loras is None else loras.key))
    )
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (loras is not None and loras.trainable))
    reads_base = loras is not None and loras.reads_base
    tokens = x.numel() // x.shape[-1]
    plan = select_plan(tokens, resident_usable, bool(weight_patches), needs_grad, reads_base)
    if plan == GEMV:
        y = gemv(x, data, qtype, shape, layout)
        if bias is not None:
            y = y + bias
        return y if loras is None else loras.add_to(y, x)
    if plan == RESIDENT:
        y = torch.nn.functional.linear(x, resident.weight, bias)
        return y if loras is None else loras.add_to(y, x, group=False, frozen=False)
    fold_group = folds_low_rank(tokens, shape)
    weight = folded_weight(data, qtype, shape, layout, loras, x.dtype, arith_dtype, group=fold_group)
    for patch in weight_patches:
        weight = patch(weight)
    y = torch.nn.functional.linear(x, weight, bias)
    return y if loras is None else loras.add_to(y, x, group=not fold_group, frozen=False)
