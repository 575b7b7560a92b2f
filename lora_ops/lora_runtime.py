"""Runtime (unmerged) LoRA: forward hooks add `strength * scale * B(A x)` to a layer's output.

No weight is ever touched, so quantized layers stay quantized, and applying, re-weighting or
removing a LoRA only swaps which `LoraStack` is active: nothing reloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
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
    # Casts of down/up for one (device, dtype), made on first use.
    _casts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
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
    adapters: Mapping[str, tuple[LowRankAdapter, ...]]

    def __post_init__(self):
        if not math.isfinite(self.strength):
            raise ValueError(f"LoRA {self.name!r}: strength must be finite, got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "adapters", {path: tuple(a) for path, a in self.adapters.items()})


class LoraStack:
    """An immutable, ordered set of applied LoRAs, indexed by module path for the hooks."""

    __slots__ = ("_entries", "_by_module", "_module_paths")

    def __init__(self, entries: Iterable[LoraEntry] = ()):
        self._entries = tuple(entries)
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate LoRA names in {names}")
        by_module: dict[str, list[tuple[float, LowRankAdapter]]] = {}
        for entry in self._entries:
            if entry.strength == 0.0:
                continue
            for path, adapters in entry.adapters.items():
                by_module.setdefault(path, []).extend((entry.strength, a) for a in adapters)
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

    def adapters_for(self, module_path: str) -> tuple[tuple[float, LowRankAdapter], ...]:
        """(strength, adapter) pairs for one module, zero-strength entries left out."""
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


def install_hooks(root: nn.Module, module_paths: Iterable[str]) -> None:
    """Hooks each `root.get_submodule(path)` once; hooking an already hooked module does nothing."""
    for path in module_paths:
        module = root.get_submodule(path)
        if getattr(module, _HOOK_ATTR, None) is None:
            module.register_forward_hook(_make_hook(path))
            setattr(module, _HOOK_ATTR, path)


def _make_hook(module_path: str):
    def lora_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor):
        stack = _active_stack.get()
        if stack is None:
            return None
        pairs = stack.adapters_for(module_path)
        if not pairs:
            return None
        x = args[0]
        for strength, adapter in pairs:
            down, up = adapter.factors_for(x)
            delta = nn.functional.linear(nn.functional.linear(x, down), up) * (strength * adapter.scale)
            target = output if adapter.out_slice is None else output.narrow(-1, *adapter.out_slice)
            # In place: a Linear does not save its output for backward, so autograd allows it,
            # and inference needs no second output-sized buffer.
            target.add_(delta)
        return output

    return lora_forward_hook
