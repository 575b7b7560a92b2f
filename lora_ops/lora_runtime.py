"""Runtime (unmerged) LoRA: forward hooks add `strength * update(x)` to a layer's output.

No weight is ever touched, so quantized layers stay quantized, and applying, re-weighting or
removing a LoRA only swaps which `LoraStack` is active: nothing reloads.

Every adapter kind offers the same two views of its update:
- `output(x, strength, base_rows)`: the separate path, `strength * ΔW x` for the rows it targets
  (differentiable; `base_rows` only for adapters with `needs_base_rows`, DoRA);
- `dense_delta(base_rows)`: the full ΔW to ADD to those rows (its own scale and any row transform
  included, not the strength), in base_rows' dtype and device, for paths that form the weight.
A layer that forms its weight on every call anyway (the quantized linears, `lora_ops/qlinear.py`)
sets `applies_lora_itself` and takes the active adapters from `active_adapters` instead: it folds
them into that weight (`dense_delta`) or runs the separate path (`add_updates`).

Strengths travel as 0-dim tensors, never as Python floats: under `torch.compile` a float would be
baked into the graph (a recompile per strength), a tensor is a graph input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

REMOVE_ALL = "all"
# The strength range the nodes accept (FluxQApplyLoRA, the grid's rows).
MAX_STRENGTH = 10.0

# Attribute marking a hooked module with its path (makes install idempotent).
_HOOK_ATTR = "_fluxq_lora_hook"

_active_stack: ContextVar[LoraStack | None] = ContextVar("fluxq_active_lora_stack", default=None)


@dataclass(frozen=True, eq=False)
class LowRankAdapter:
    """One low-rank update `scale * up @ down`, optionally onto a row range of a fused layer.

    Equality is identity: tensors have no boolean `==`.
    """

    down: torch.Tensor  # A: (rank, in_features), fp32 master
    up: torch.Tensor  # B: (out_part, rank), fp32 master
    scale: float  # alpha / rank
    out_slice: tuple[int, int] | None = None  # (offset, size) into the layer's output features
    # Row transform of the update (ComfyUI's key maps reorder some rows, e.g. FLUX's final
    # modulation): update row i is row row_order[i] of up @ down. Folded into `up` at construction.
    row_order: torch.Tensor | None = None
    # LoRA dropout while training (as PEFT: on the low-rank path's input), only where gradients
    # are being recorded for trainable factors; sampling and inference never drop.
    dropout: float = 0.0
    # Casts of down/up for one (device, dtype), made on first use.
    _casts: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    needs_base_rows = False

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        if self.row_order is not None:
            object.__setattr__(self, "up", self.up.index_select(0, self.row_order.to(self.up.device)))
            object.__setattr__(self, "row_order", None)
        if self.down.dim() != 2 or self.up.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"LoRA shapes do not chain: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )
        if self.out_slice is not None and self.out_slice[1] != self.up.shape[0]:
            raise ValueError(f"out_slice {self.out_slice} does not match up rows {self.up.shape[0]}")
        # .float() is a no-op on fp32 tensors, so trainable nn.Parameters keep their identity.
        object.__setattr__(self, "down", self.down.float())
        object.__setattr__(self, "up", self.up.float())
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def trainable(self) -> bool:
        """Gradients must reach the factors: only the low-rank path gives them (never fold)."""
        return self.down.requires_grad or self.up.requires_grad

    def dense_delta(self, base_rows: torch.Tensor) -> torch.Tensor:
        """The full update `scale * up @ down` to ADD to the rows this adapter targets (its
        `out_slice` of the weight), in base_rows' dtype and device; the strength is not included.
        Every adapter kind provides this (DoRA needs `base_rows`; a plain LoRA ignores its values)."""
        down, up = self.factors_for(base_rows)
        return torch.mm(up, down).mul_(self.scale)

    def factors_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in x's device and dtype."""
        if self.down.requires_grad or self.up.requires_grad:
            # Trainable masters: cast on every call so gradients flow back to them.
            return self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        # No inference-mode query on this path: torch.compile cannot trace one (a graph break in
        # every hooked layer); the casts are made usable in and out of inference mode instead.
        key = (x.device, x.dtype)
        factors = self._casts.get(key)
        if factors is None:
            factors = tuple(_cast(t, x.device, x.dtype) for t in (self.down, self.up))
            self._casts[key] = factors
        return factors

    def output(self, x: torch.Tensor, strength: torch.Tensor, base_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The separate path: `strength * scale * up(down(x))`, the update of the targeted features."""
        down, up = self.factors_for(x)
        if self.dropout and torch.is_grad_enabled() and self.trainable:
            x = nn.functional.dropout(x, self.dropout, training=True)
        return nn.functional.linear(nn.functional.linear(x, down), up) * self.scale * _on(strength, x)


@dataclass(frozen=True, eq=False)
class KroneckerAdapter:
    """LoKr: `scale * kron(w1, w2)`, applied as `w1 · X · w2ᵀ` on the input viewed as a matrix,
    so no dense (out x in) update is ever formed on the separate path."""

    w1: torch.Tensor  # (out1, in1)
    w2: torch.Tensor  # (out2, in2); the layer is (out1*out2, in1*in2)
    scale: float
    out_slice: tuple[int, int] | None = None
    row_order: torch.Tensor | None = None  # as LowRankAdapter's, applied to the output here
    needs_base_rows = False
    trainable = False  # the trainer makes LowRankAdapters only

    def __post_init__(self):
        if self.w1.dim() != 2 or self.w2.dim() != 2:
            raise ValueError(f"LoKr factors must be matrices, got {tuple(self.w1.shape)} and {tuple(self.w2.shape)}")
        object.__setattr__(self, "w1", self.w1.float())
        object.__setattr__(self, "w2", self.w2.float())
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def output(self, x: torch.Tensor, strength: torch.Tensor, base_rows: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self.w1.to(x.device, x.dtype), self.w2.to(x.device, x.dtype)
        blocks = x.unflatten(-1, (w1.shape[1], w2.shape[1]))  # (..., in1, in2)
        y = torch.matmul(w1, torch.matmul(blocks, w2.T)).flatten(-2) * self.scale * _on(strength, x)
        return y if self.row_order is None else y.index_select(-1, self.row_order.to(y.device))

    def dense_delta(self, base_rows: torch.Tensor) -> torch.Tensor:
        device = base_rows.device
        delta = torch.kron(self.w1.to(device), self.w2.to(device)) * self.scale
        if self.row_order is not None:
            delta = delta.index_select(0, self.row_order.to(device))
        return delta.to(base_rows.dtype)


@dataclass(frozen=True, eq=False)
class DoRAAdapter:
    """Weight-decomposed update around another adapter's ΔW, as ComfyUI core computes it:
    `W' = W + strength·(m·(W + ΔW)/‖·‖ − W)`. The norm is over each output row of W when the
    magnitude `m` has one value per row (core takes that norm from W itself), else over each input
    column of W + ΔW. It depends on W, so both views read the base rows."""

    inner: LowRankAdapter | KroneckerAdapter
    magnitude: torch.Tensor  # core's dora_scale: (out_part, 1) or (1, in)
    out_slice: tuple[int, int] | None = None
    needs_base_rows = True
    trainable = False

    def __post_init__(self):
        object.__setattr__(self, "magnitude", self.magnitude.float())

    def output(self, x: torch.Tensor, strength: torch.Tensor, base_rows: torch.Tensor | None = None) -> torch.Tensor:
        if base_rows is None:
            raise ValueError("DoRA needs the layer's base weight rows")
        return nn.functional.linear(x, self.dense_delta(base_rows).to(x.dtype)) * _on(strength, x)

    def dense_delta(self, base_rows: torch.Tensor) -> torch.Tensor:
        weight = base_rows.float()
        merged = weight + self.inner.dense_delta(weight)
        magnitude = self.magnitude.to(weight.device)
        if magnitude.shape[0] == weight.shape[0]:  # one magnitude per output row
            norm = weight.norm(dim=1, keepdim=True)
        else:
            norm = merged.norm(dim=0, keepdim=True)
        merged = merged * (magnitude / (norm + torch.finfo(torch.float32).eps))
        return (merged - weight).to(base_rows.dtype)


Adapter = LowRankAdapter | KroneckerAdapter | DoRAAdapter


def hadamard_as_low_rank(w1a, w1b, w2a, w2b) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa's `(w1a @ w1b) * (w2a @ w2b)` as one low-rank product `up @ down` of rank r1*r2
    (the face-splitting identity), so it runs on the LoRA path without a dense update."""
    up = (w1a.float().unsqueeze(2) * w2a.float().unsqueeze(1)).flatten(1)  # (out, r1*r2)
    down = (w1b.float().unsqueeze(1) * w2b.float().unsqueeze(0)).flatten(0, 1)  # (r1*r2, in)
    return down, up


def _on(strength: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 0-dim strength on x's device (a graph input under torch.compile, never a constant)."""
    return strength.to(x.device, non_blocking=True)


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # ComfyUI loads files under inference_mode; such tensors cannot be saved for backward, which
    # a frozen LoRA active during training needs. A copy made outside inference mode can, and
    # inference uses it just as well.
    with torch.inference_mode(False):
        out = t.to(device, dtype)
        return out.clone() if out.is_inference() else out


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One applied LoRA: a name, a user strength, and adapters per module path (BFL names)."""

    name: str
    strength: float
    adapters: Mapping[str, tuple[Adapter, ...]]
    # The strength its text-encoder part was applied with to a CLIP (None: not applied), so a grid
    # can say that a prompt encoded by that CLIP carries it whatever the MODEL strength.
    clip_strength: float | None = None
    # The strength as the hooks and folds use it: a graph input under torch.compile, not a constant.
    strength_tensor: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not math.isfinite(self.strength):
            raise ValueError(f"LoRA {self.name!r}: strength must be finite, got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "strength_tensor", torch.tensor(self.strength, dtype=torch.float32))
        object.__setattr__(self, "adapters", {path: tuple(a) for path, a in self.adapters.items()})


class LoraStack:
    """An immutable, ordered set of applied LoRAs, indexed by module path for the hooks."""

    __slots__ = ("_by_module", "_entries", "_module_paths")

    def __init__(self, entries: Iterable[LoraEntry] = ()):
        self._entries = tuple(entries)
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate LoRA names in {names}")
        # Zero-strength entries stay in: which adapters a layer sees must not depend on strength
        # values (a compiled graph would recompile); the update is selected away instead (`scaled`).
        by_module: dict[str, list[tuple[torch.Tensor, Adapter]]] = {}
        for entry in self._entries:
            for path, adapters in entry.adapters.items():
                by_module.setdefault(path, []).extend((entry.strength_tensor, a) for a in adapters)
        self._by_module = {path: tuple(pairs) for path, pairs in by_module.items()}
        self._module_paths = frozenset(path for e in self._entries for path in e.adapters)

    @property
    def entries(self) -> tuple[LoraEntry, ...]:
        return self._entries

    @property
    def is_empty(self) -> bool:
        return not self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self._entries)

    def module_paths(self) -> frozenset[str]:
        """Every module some entry adapts, zero-strength entries included."""
        return self._module_paths

    def adapters_for(self, module_path: str) -> tuple[tuple[torch.Tensor, Adapter], ...]:
        """(strength as a 0-dim fp32 tensor, adapter) pairs for one module, in stack order."""
        return self._by_module.get(module_path, ())

    def with_lora(self, entry: LoraEntry) -> LoraStack:
        """Adds `entry`; an entry of the same name is replaced in place."""
        if entry.name in self.names():
            return LoraStack(entry if e.name == entry.name else e for e in self._entries)
        return LoraStack((*self._entries, entry))

    def without(self, name: str) -> LoraStack:
        """Removes the named LoRA, or every LoRA for `"all"`."""
        if name == REMOVE_ALL:
            return LoraStack()
        self._check_applied(name)
        return LoraStack(e for e in self._entries if e.name != name)

    def with_strength(self, name: str, strength: float) -> LoraStack:
        self._check_applied(name)
        return LoraStack(
            dataclasses.replace(e, strength=strength) if e.name == name else e for e in self._entries
        )

    def _check_applied(self, name: str) -> None:
        if name not in self.names():
            applied = ", ".join(repr(n) for n in self.names()) or "none"
            raise KeyError(f"no LoRA named {name!r} is applied (applied: {applied})")

    def __deepcopy__(self, memo) -> LoraStack:
        # Immutable; ComfyUI deep-copies model_options on every clone and must not copy tensors.
        return self

    def __repr__(self) -> str:
        return "LoraStack(" + ", ".join(f"{e.name}@{e.strength:g}" for e in self._entries) + ")"


@contextlib.contextmanager
def activate(stack: LoraStack | None) -> Iterator[None]:
    """Makes `stack` the one the hooks apply (None: no LoRA) for the duration of the block."""
    token = _active_stack.set(stack)
    try:
        yield
    finally:
        _active_stack.reset(token)


BaseWeight = Callable[[nn.Module, torch.dtype, torch.device], torch.Tensor]


def _plain_weight(module: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return module.weight.to(device, dtype)


def install_hooks(root: nn.Module, module_paths: Iterable[str], base_weight: BaseWeight = _plain_weight) -> None:
    """Hooks each `root.get_submodule(path)` once; hooking an already hooked module does nothing.

    `base_weight(module, dtype, device)` gives a layer's float weight (for quantized layers, its
    dequantization); only adapters that read the base rows (DoRA) call it.
    """
    for path in module_paths:
        module = root.get_submodule(path)
        if getattr(module, _HOOK_ATTR, None) is None:
            module.register_forward_hook(_make_hook(base_weight))
            setattr(module, _HOOK_ATTR, path)


def active_adapters(module: nn.Module) -> tuple[tuple[torch.Tensor, Adapter], ...]:
    """(strength, adapter) pairs the active stack holds for a hooked module; () when none."""
    stack = _active_stack.get()
    path = getattr(module, _HOOK_ATTR, None)
    if stack is None or path is None:
        return ()
    return stack.adapters_for(path)


def _make_hook(base_weight: BaseWeight):
    def lora_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor):
        if getattr(module, "applies_lora_itself", False):
            return None
        pairs = active_adapters(module)
        if not pairs:
            return None
        x = args[0]
        # Norms in fp32, as core.
        return add_updates(output, x, pairs, lambda: base_weight(module, torch.float32, x.device))

    return lora_forward_hook


def scaled(base: torch.Tensor, update: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """`base + strength * update`, and exactly `base` (bits, signed zeros included) at strength 0."""
    strength = strength.to(base.device, non_blocking=True)
    return torch.where(strength != 0, base + update * strength, base)


def add_updates(output: torch.Tensor, x: torch.Tensor, pairs,
                base_weight: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """The separate path: adds each adapter's `output` to its output features, and exactly
    nothing at strength 0. `base_weight()` gives the layer's float weight, asked for once and only
    when an adapter reads the base rows (DoRA)."""
    weight = None
    for strength, adapter in pairs:
        base_rows = None
        if adapter.needs_base_rows:
            if base_weight is None:
                raise ValueError(f"{type(adapter).__name__} needs the layer's base weight rows")
            if weight is None:
                weight = base_weight()
            base_rows = weight if adapter.out_slice is None else weight.narrow(0, *adapter.out_slice)
        delta = adapter.output(x, strength, base_rows)
        target = output if adapter.out_slice is None else output.narrow(-1, *adapter.out_slice)
        # In place: a Linear does not save its output for backward, so autograd allows it,
        # and inference needs no second output-sized buffer.
        target.copy_(torch.where(strength.to(target.device, non_blocking=True) != 0, target + delta, target))
    return output
