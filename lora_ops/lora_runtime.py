"""Runtime (unmerged) LoRA: forward hooks add `strength * update(x)` to a layer's output.

No weight is ever touched, so quantized layers stay quantized, and applying, re-weighting or
removing a LoRA only swaps which `LoraStack` is active: nothing reloads.

Every adapter kind offers the same two views of its update:
- `output(x, strength, base_rows)`: the separate path, `strength * ΔW x` for the rows it targets
  (differentiable; `base_rows` only for adapters with `needs_base_rows`, DoRA);
- `dense_delta(base_rows)`: the full ΔW to ADD to those rows (its own scale and any row transform
  included, not the strength), in base_rows' dtype and device, for paths that form the weight.
A layer that forms its weight on every call anyway (the quantized linears, `lora_ops/qlinear.py`)
sets `applies_lora_itself` and takes its `LayerLoras` from `active_loras` instead: it folds them
into that weight or runs the separate path.

What a layer applies is resolved when a stack is activated, outside any compiled graph: `activate`
sets on every hooked module a `LayerLoras` (tensors in the compute dtype and device, strengths
included). The forward reads that attribute and nothing else: no path, no context variable, no
dict. Under `torch.compile` (ComfyUI's TorchCompileModel) a strength change, a second low-rank LoRA
of another rank, a removal or a re-application are new values and sizes of the same tensors (the
group's rank is a dynamic dimension), never a recompile; only a new set of adapted layers, or a
LoKr/DoRA adapter coming or going (each is its own term of the graph), traces again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .block_weights import BlockWeights

REMOVE_ALL = "all"
# The strength range the nodes accept (FluxQApplyLoRA, the grid's rows).
MAX_STRENGTH = 10.0

# Attribute marking a hooked module with its path (makes install idempotent).
_HOOK_ATTR = "_fluxq_lora_hook"
# Attribute holding a hooked module's `LayerLoras` while a stack is active (None otherwise).
_LORAS_ATTR = "fluxq_loras"
# Every hooked module (weakly: a dropped model leaves nothing behind); `activate` sets their state.
_hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# The hooked modules under each root `install_hooks` was given: two loaded models share layer paths
# (and their layers may differ in shape: FLUX.1 and FLUX.2), so a model's call activates its own.
_hooked_under: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[nn.Module]] = weakref.WeakKeyDictionary()
# The fewest rank rows a layer's low-rank group has (zero-padded): dynamo specializes sizes 0 and 1,
# so a group of rank 1 or 0 (an emptied stack) would be a new graph.
_MIN_GROUP_RANK = 2


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
        """(down, up) in x's device and dtype, cast on every call (trainable masters get their
        gradients through it; frozen adapters reach layers as a `LayerLoras`, cast once)."""
        return self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)

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


def _usable_by_autograd(t: torch.Tensor) -> torch.Tensor:
    # ComfyUI loads files under inference_mode; such tensors cannot be saved for backward, which
    # a frozen LoRA active during training needs. A copy made outside inference mode can, and
    # inference uses it just as well. Called when a stack is activated, never in a forward:
    # torch.compile cannot trace the inference-mode query.
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _frozen_copy(adapter: Adapter) -> Adapter:
    """`adapter` with every tensor usable by autograd (the same object when they all are)."""
    if isinstance(adapter, DoRAAdapter):
        inner, magnitude = _frozen_copy(adapter.inner), _usable_by_autograd(adapter.magnitude)
        same = inner is adapter.inner and magnitude is adapter.magnitude
        return adapter if same else dataclasses.replace(adapter, inner=inner, magnitude=magnitude)
    names = ("w1", "w2") if isinstance(adapter, KroneckerAdapter) else ("down", "up")
    tensors = {n: _usable_by_autograd(getattr(adapter, n)) for n in names}
    same = all(t is getattr(adapter, n) for n, t in tensors.items())
    return adapter if same else dataclasses.replace(adapter, **tensors)


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One applied LoRA: a name, a user strength, and adapters per module path (BFL names)."""

    name: str
    strength: float
    adapters: Mapping[str, tuple[Adapter, ...]]
    # The strength its text-encoder part was applied with to a CLIP (None: not applied), so a grid
    # can say that a prompt encoded by that CLIP carries it whatever the MODEL strength.
    clip_strength: float | None = None
    # Per-block factors on the strength (`lora_ops.block_weights`): a layer inside double_blocks.N /
    # single_blocks.N runs at strength x its block's weight, every other layer at the strength.
    # None: 1 everywhere.
    block_weights: BlockWeights | None = None
    # The strength as the hooks and folds use it: a graph input under torch.compile, not a constant.
    strength_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    # The paths whose block weight is not 1, with their strength x weight (0-dim tensors as well:
    # a block-weight change is a new value, like a strength change).
    _path_strengths: Mapping[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not math.isfinite(self.strength):
            raise ValueError(f"LoRA {self.name!r}: strength must be finite, got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "strength_tensor", torch.tensor(self.strength, dtype=torch.float32))
        object.__setattr__(self, "adapters", {path: tuple(a) for path, a in self.adapters.items()})
        weights = {} if self.block_weights is None else {p: self.block_weights.for_path(p) for p in self.adapters}
        object.__setattr__(self, "_path_strengths", {
            path: torch.tensor(self.strength * weight, dtype=torch.float32)
            for path, weight in weights.items() if weight != 1.0})

    def strength_for(self, module_path: str) -> torch.Tensor:
        """The strength the layer at `module_path` runs at: the strength x its block weight."""
        return self._path_strengths.get(module_path, self.strength_tensor)


def fold_key(pairs: Iterable[tuple[torch.Tensor, Adapter]]) -> tuple:
    """What a folded weight holds: which adapters (compared by identity; held, so an id is never
    reused while a key names it) at which strengths (host values; eager only)."""
    return tuple((adapter, float(strength)) for strength, adapter in pairs)


@dataclass(frozen=True, eq=False)
class LayerLoras:
    """Everything one layer applies for one stack, resolved outside traced code (`layer_loras`).

    The frozen low-rank adapters (LoRA, LoHa) form ONE group: their factors concatenated along
    the rank, each adapter's B placed on its `out_slice` rows (zeros elsewhere), one coefficient
    (strength x scale) per rank row. Adding, removing or re-weighting them changes the values and
    the rank (a dynamic dimension), never the code a compiler traces. `active` selects the base
    exactly (bits, signed zeros included) when every group strength is 0. LoKr, DoRA and trainable
    adapters stay one term each (`frozen_others`, `trainable_others`), applied as before.
    """

    down: torch.Tensor  # (R, in) float32, R >= _MIN_GROUP_RANK
    up: torch.Tensor  # (out, R) float32
    # The same factors in the compute dtype (the separate path's; `down`/`up` when that is float32).
    down_c: torch.Tensor
    up_c: torch.Tensor
    coef: torch.Tensor  # (R,) float32, 0 on padding rows
    active: torch.Tensor  # 0-dim bool
    frozen_others: tuple[tuple[torch.Tensor, Adapter], ...]
    trainable_others: tuple[tuple[torch.Tensor, Adapter], ...]
    # Host-side facts, read only outside compiled code (or structural: fixed for a set of kinds).
    key: tuple  # fold_key of the frozen adapters: what a resident copy must hold
    group_idle: bool  # every group strength is 0: eager calls skip the group (the same bits)
    reads_base: bool  # some adapter reads the layer's base rows (DoRA)

    @property
    def trainable(self) -> bool:
        return bool(self.trainable_others)

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) on like's device, in like's dtype, from the cast made at activation when it fits."""
        down, up = (self.down_c, self.up_c) if self.down_c.dtype == like.dtype else (self.down, self.up)
        return down.to(like.device, like.dtype), up.to(like.device, like.dtype)

    def _skip_group(self) -> bool:
        # Eager calls skip a group whose strengths are all 0; compiled code always runs it (a
        # host flag read there would be baked in: a recompile between 0 and another strength).
        return not torch.compiler.is_compiling() and self.group_idle

    def fold_(self, weight: torch.Tensor, group: bool = True) -> torch.Tensor:
        """Adds the group (when `group`) and the frozen others to `weight` in place, in weight's
        dtype; rows stay exactly as they were where strengths are 0. Adapters that read the base
        rows (DoRA) get the weight as it came in, in float32 (core takes its norms in float32)."""
        base = weight.to(torch.float32, copy=True) if self.reads_base else None
        if group and not self._skip_group():
            down, up = self._factors(weight)
            up = up * self.coef.to(weight.device, weight.dtype)
            if torch.compiler.is_compiling():
                weight.copy_(torch.where(self.active.to(weight.device), weight + torch.mm(up, down), weight))
            else:
                # Eager calls skipped an all-zero group above: one in-place pass over the weight
                # (a resident rebuild on a strength change is mostly this and the dequantization).
                weight.addmm_(up, down)
        for strength, adapter in self.frozen_others:
            rows = weight if adapter.out_slice is None else weight.narrow(0, *adapter.out_slice)
            if adapter.needs_base_rows:
                base_rows = base if adapter.out_slice is None else base.narrow(0, *adapter.out_slice)
                delta = adapter.dense_delta(base_rows).to(rows.dtype)
            else:
                delta = adapter.dense_delta(rows)
            rows.copy_(scaled(rows, delta, strength))
        return weight

    def add_to(self, output: torch.Tensor, x: torch.Tensor, base_weight: Callable[[], torch.Tensor] | None = None,
               group: bool = True, frozen: bool = True) -> torch.Tensor:
        """The separate path: `output` plus the group's update (when `group`), the frozen others'
        (when `frozen`) and the trainable ones' (always); exactly `output` where strengths are 0."""
        if group and not self._skip_group():
            down, up = self._factors(x)
            hidden = nn.functional.linear(x, down) * self.coef.to(x.device, x.dtype)
            output = torch.where(self.active.to(x.device), output + nn.functional.linear(hidden, up), output)
        others = (self.frozen_others + self.trainable_others) if frozen else self.trainable_others
        return add_updates(output, x, others, base_weight) if others else output


def layer_loras(pairs: Iterable[tuple[torch.Tensor, Adapter]], out_features: int, in_features: int,
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                factors: tuple[torch.Tensor, ...] | None = None) -> LayerLoras:
    """A layer's `LayerLoras` for (strength, adapter) pairs: factors on `device` (default: where
    the adapters are) in float32 and `dtype`; `factors` reuses the group factors of the same
    adapters (a strength change). Made outside inference mode, so training can use them too."""
    pairs = tuple(pairs)
    grouped = tuple(p for p in pairs if isinstance(p[1], LowRankAdapter) and not p[1].trainable)
    frozen = tuple((_usable_by_autograd(s), _frozen_copy(a)) for s, a in pairs
                   if not isinstance(a, LowRankAdapter) and not a.trainable)
    trainable = tuple(p for p in pairs if p[1].trainable)
    if device is None:
        device = grouped[0][1].down.device if grouped else torch.device("cpu")
    rank = max(sum(a.rank for _, a in grouped), _MIN_GROUP_RANK)
    with torch.inference_mode(False), torch.no_grad():
        if factors is None:
            down = torch.zeros(rank, in_features, device=device)
            up = torch.zeros(out_features, rank, device=device)
            row = 0
            for _, adapter in grouped:
                down[row:row + adapter.rank].copy_(adapter.down)
                rows = up if adapter.out_slice is None else up.narrow(0, *adapter.out_slice)
                rows[:, row:row + adapter.rank].copy_(adapter.up)
                row += adapter.rank
            cast = dtype is not None and dtype != torch.float32
            factors = (down, up, down.to(dtype) if cast else down, up.to(dtype) if cast else up)
        coef = torch.zeros(rank)
        row = 0
        for strength, adapter in grouped:
            coef[row:row + adapter.rank] = float(strength) * adapter.scale
            row += adapter.rank
        coef = coef.to(device)
        any_active = any(float(s) != 0 for s, _ in grouped)
        active = torch.tensor(any_active, device=device)
    for tensor, dim in zip((*factors, coef), (0, 1, 0, 1, 0)):
        # The rank is a size the user changes (a second LoRA, a removal): traced as a symbol.
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return LayerLoras(*factors, coef=coef, active=active, frozen_others=frozen, trainable_others=trainable,
                      key=fold_key(p for p in pairs if not p[1].trainable), group_idle=not any_active,
                      reads_base=any(a.needs_base_rows for _, a in pairs))


class LoraStack:
    """An immutable, ordered set of applied LoRAs, indexed by module path for the hooks."""

    __slots__ = ("_by_module", "_entries", "_factors", "_layers", "_module_paths")

    def __init__(self, entries: Iterable[LoraEntry] = (), _factors: dict | None = None):
        self._entries = tuple(entries)
        # Per (module path, shape, device, dtype): this stack's LayerLoras, and the group factors,
        # which a strength change shares (`with_strength`). Built outside traced code, freed with
        # the stack.
        self._layers: dict[tuple, LayerLoras] = {}
        self._factors: dict[tuple, tuple[torch.Tensor, ...]] = {} if _factors is None else _factors
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate LoRA names in {names}")
        # Zero-strength entries stay in: which adapters a layer sees must not depend on strength
        # values (a compiled graph would recompile); the update is selected away instead (`scaled`).
        by_module: dict[str, list[tuple[torch.Tensor, Adapter]]] = {}
        for entry in self._entries:
            for path, adapters in entry.adapters.items():
                by_module.setdefault(path, []).extend((entry.strength_for(path), a) for a in adapters)
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

    def layer_loras(self, module_path: str, out_features: int, in_features: int,
                    device: torch.device | None = None, dtype: torch.dtype | None = None) -> LayerLoras:
        """What the module at `module_path` applies for this stack (an idle group when nothing)."""
        key = (module_path, out_features, in_features, device, dtype)
        loras = self._layers.get(key)
        if loras is None:
            loras = layer_loras(self.adapters_for(module_path), out_features, in_features, device, dtype,
                                self._factors.get(key))
            self._layers[key] = loras
            self._factors[key] = (loras.down, loras.up, loras.down_c, loras.up_c)
        return loras

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
            (dataclasses.replace(e, strength=strength) if e.name == name else e for e in self._entries),
            _factors=self._factors,  # the same adapters: the same group factors
        )

    def with_block_weights(self, name: str, block_weights: BlockWeights | None) -> LoraStack:
        """The named LoRA with these block weights (None: 1 everywhere), at its strength."""
        self._check_applied(name)
        return LoraStack(
            (dataclasses.replace(e, block_weights=block_weights) if e.name == name else e for e in self._entries),
            _factors=self._factors,
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
def activate(stack: LoraStack | None, device: torch.device | None = None,
             dtype: torch.dtype | None = None, root: nn.Module | None = None) -> Iterator[None]:
    """Makes `stack` the one the hooked modules apply (None: no LoRA) for the duration of the block:
    each gets its `LayerLoras` (cast to `dtype` on `device` when given, else cast per call) as an
    attribute, set here, outside any compiled graph; the previous ones come back on exit. With
    `root` (the root given to `install_hooks`), only that model's hooked modules, else all."""
    modules = list(_hooked if root is None else _hooked_under.get(root, ()))
    previous = [module.__dict__.get(_LORAS_ATTR) for module in modules]
    try:
        for module in modules:
            module.__dict__[_LORAS_ATTR] = None if stack is None else stack.layer_loras(
                getattr(module, _HOOK_ATTR), module.out_features, module.in_features, device, dtype)
        yield
    finally:
        for module, loras in zip(modules, previous):
            module.__dict__[_LORAS_ATTR] = loras


def active_loras(module: nn.Module) -> LayerLoras | None:
    """The `LayerLoras` the active stack set on a hooked module; None when none is active."""
    return getattr(module, _LORAS_ATTR, None)


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
            _hooked.add(module)
            _hooked_under.setdefault(root, weakref.WeakSet()).add(module)


@functools.cache
def _make_hook(base_weight: BaseWeight):
    # One hook object per base_weight function, shared by every module: compiled code guarded on a
    # module's hooks then matches every block of a model (a closure per module would not).
    def lora_forward_hook(module: nn.Module, args: tuple, output: torch.Tensor):
        loras = active_loras(module)
        if loras is None or getattr(module, "applies_lora_itself", False):
            return None
        x = args[0]
        # Norms in fp32, as core.
        return loras.add_to(output, x, lambda: base_weight(module, torch.float32, x.device))

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
