"""LoRA workbench: merge several LoRAs into one, resize one to a lower rank, extract one from two
models (fine-tuned minus base). Pure torch; the results are written as kohya FLUX LoRAs.

A layer's update is held as low-rank factors `(down, up)` on the layer's full rows, with every
scale (alpha/rank, the per-LoRA weight) folded into `up`: the update is `up @ down`, and the file
records `alpha = rank`, so ComfyUI and this pack apply it with scale 1.

Truncation keeps the leading singular triplets of the update, the best approximation of its rank
in the Frobenius norm (Eckart-Young): the relative error reported per layer is
`sqrt(sum of the discarded s_i^2) / sqrt(sum of all s_i^2)`. Updates given as factors (the usual
LoRAs) are decomposed through two thin QR factorisations and the SVD of a rank x rank matrix, so
no (out x in) matrix is formed; other kinds (LoKr) and extraction decompose the dense update.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import safetensors.torch
import torch

from .atomic import atomic_path
from .errors import user_facing
from .lora_formats import kohya_name
from .lora_runtime import Adapter, LowRankAdapter
from .model_weights import WeightSource, stored_equal

LowRank = tuple[torch.Tensor, torch.Tensor]  # (down: rank x in, up: out x rank), scales folded into up
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@user_facing
class LoraToolError(ValueError):
    """Inputs the workbench cannot turn into a LoRA; the message names the layer or tensor."""


@dataclass(frozen=True)
class LayerResult:
    """One written layer: its rank and the relative Frobenius error of its update (0 when exact)."""

    path: str
    rank: int
    relative_error: float


@dataclass(frozen=True)
class RankRule:
    """How many singular triplets to keep: `rank` (the most, when `kept_fraction` is given), and
    kohya resize_lora's `sv_fro` rule, the fewest whose Frobenius norm is at least `kept_fraction`
    of the whole update's."""

    rank: int
    kept_fraction: float | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise LoraToolError(f"rank must be at least 1, got {self.rank}")
        if self.kept_fraction is not None and not 0.0 < self.kept_fraction <= 1.0:
            raise LoraToolError(f"kept fraction must be in (0, 1], got {self.kept_fraction}")

    def choose(self, singular_values: torch.Tensor) -> int:
        s = singular_values.double()
        limit = min(self.rank, s.numel())
        if self.kept_fraction is None:
            return limit
        kept = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
        # the first index whose kept norm reaches the fraction (rounding: within 1e-12)
        k = int(torch.searchsorted(kept, torch.tensor(self.kept_fraction - 1e-12, dtype=torch.float64))) + 1
        return max(1, min(k, limit))


# --- one layer ----------------------------------------------------------------------------------

def low_rank_on_rows(adapter: Adapter, rows: int) -> LowRank | None:
    """A plain LoRA's update as factors on all `rows` of its layer, its scale folded into `up`;
    None for kinds without exact low-rank factors (LoKr, DoRA)."""
    if not isinstance(adapter, LowRankAdapter):
        return None
    up = adapter.up.detach().float() * adapter.scale
    if adapter.out_slice is not None:
        offset, size = adapter.out_slice
        up = torch.zeros(rows, up.shape[1]).index_copy_(0, torch.arange(offset, offset + size), up)
    return adapter.down.detach().float(), up


def dense_on_rows(adapter: Adapter, rows: int, columns: int) -> torch.Tensor:
    """An adapter's full update on all `rows` of its layer (scale included, strength not)."""
    if adapter.needs_base_rows:
        raise LoraToolError("a DoRA update depends on the base weight it is applied to, so it cannot be turned "
                            "into a plain LoRA here; apply it at run time instead")
    probe = torch.empty(0, dtype=torch.float32)  # dense_delta takes dtype and device from it
    delta = adapter.dense_delta(probe).float()
    if adapter.out_slice is None:
        return delta
    full = torch.zeros(rows, columns)
    full.narrow(0, *adapter.out_slice).copy_(delta)
    return full


def _balanced(left: torch.Tensor, s: torch.Tensor, right_t: torch.Tensor) -> LowRank:
    """(down, up) of `left @ diag(s) @ right_t` with the singular values split evenly (as kohya)."""
    root = torch.sqrt(s)
    return (root[:, None] * right_t).float().contiguous(), (left * root[None, :]).float().contiguous()


def truncate_factors(down: torch.Tensor, up: torch.Tensor, rule: RankRule) -> tuple[LowRank, float, torch.Tensor]:
    """Best `rule` approximation of `up @ down`: ((down, up), relative error, all singular values).

    Computed in float64 through QR: up = Qu Ru, downᵀ = Qd Rd, so up @ down = Qu (Ru Rdᵀ) Qdᵀ and
    the SVD of the small Ru Rdᵀ gives the update's."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return _truncate(q_up @ u, s, vh @ q_down.T, rule)


def truncate_dense(delta: torch.Tensor, rule: RankRule) -> tuple[LowRank, float, torch.Tensor]:
    """Best `rule` approximation of the matrix `delta` (SVD in float32; float64 for small ones)."""
    dtype = torch.float64 if delta.numel() <= 1 << 22 else torch.float32
    u, s, vh = torch.linalg.svd(delta.to(dtype), full_matrices=False)
    return _truncate(u, s, vh, rule)


def _truncate(u, s, vh, rule: RankRule) -> tuple[LowRank, float, torch.Tensor]:
    k = rule.choose(s)
    total = float((s.double() ** 2).sum())
    error = math.sqrt(float((s[k:].double() ** 2).sum()) / total) if total > 0 else 0.0
    return _balanced(u[:, :k], s[:k], vh[:k]), error, s


# --- merge and resize ---------------------------------------------------------------------------

Contributions = Mapping[str, Sequence[tuple[float, Adapter]]]


def merge_layers(layers: Contributions, shapes: Mapping[str, tuple[int, int]],
                 rule: RankRule | None = None) -> tuple[dict[str, LowRank], list[LayerResult]]:
    """One LoRA holding, per layer, the sum of `weight x update` of its contributions.

    `layers`: {module path: [(weight, adapter), ...]}; `shapes`: {module path: (out, in)} of the
    layers. Without `rule` the factors are concatenated (exact; the ranks add up; LoKr and DoRA
    refused); with it each layer's summed update is truncated by `rule`.
    """
    out: dict[str, LowRank] = {}
    results: list[LayerResult] = []
    for path in sorted(layers):
        rows, columns = shapes[path]
        pairs = [(float(w), a) for w, a in layers[path] if float(w) != 0.0]
        if not pairs:
            continue
        factors = [low_rank_on_rows(a, rows) for _, a in pairs]
        if rule is None:
            missing = [type(a).__name__ for (_, a), f in zip(pairs, factors) if f is None]
            if missing:
                raise LoraToolError(f"{path}: a {missing[0]} update has no exact low-rank factors; merge it to a "
                                    "target rank instead of exactly")
            down = torch.cat([d for d, _ in factors])
            up = torch.cat([u * w for (w, _), (_, u) in zip(pairs, factors)], dim=1)
            out[path] = (down, up)
            results.append(LayerResult(path, down.shape[0], 0.0))
            continue
        try:
            if all(f is not None for f in factors):
                down = torch.cat([d for d, _ in factors])
                up = torch.cat([u * w for (w, _), (_, u) in zip(pairs, factors)], dim=1)
                (down, up), error, _ = truncate_factors(down, up, rule)
            else:
                delta = sum(w * dense_on_rows(a, rows, columns) for w, a in pairs)
                (down, up), error, _ = truncate_dense(delta, rule)
        except LoraToolError as problem:
            raise LoraToolError(f"{path}: {problem}") from None
        out[path] = (down, up)
        results.append(LayerResult(path, down.shape[0], error))
    if not out:
        raise LoraToolError("nothing to write: every contribution has weight 0")
    return out, results


# --- extract ------------------------------------------------------------------------------------

def _matrix_paths(source: WeightSource) -> dict[str, tuple[int, ...]]:
    return {n[:-len(".weight")]: source.shape(n) for n in source.names()
            if n.endswith(".weight") and len(source.shape(n)) == 2}


def extract_lora(base: WeightSource, tuned: WeightSource, rule: RankRule,
                 progress: Callable[[int, int, str], None] | None = None,
                 ) -> tuple[dict[str, LowRank], list[LayerResult], list[str]]:
    """A LoRA approximating `tuned - base` on every matrix (linear layer weight) of the models.

    Streams: each layer's two weights are read, differenced and decomposed, then dropped.
    Returns (factors, per-layer results, names of non-matrix tensors that differ: a LoRA cannot
    carry those). Layers whose weights are equal are left out. Models whose matrices differ in
    name or shape are refused (not one family).
    """
    base_paths, tuned_paths = _matrix_paths(base), _matrix_paths(tuned)
    only = sorted(set(base_paths) ^ set(tuned_paths))
    if only:
        side = "base" if only[0] in base_paths else "fine-tuned"
        raise LoraToolError(f"the models are not of one family: {len(only)} layer(s) are in only one of them, "
                            f"e.g. {only[0]!r} only in the {side} model")
    for path, shape in base_paths.items():
        if tuple(tuned_paths[path]) != tuple(shape):
            raise LoraToolError(f"the models are not of one family: {path}.weight is {tuple(shape)} in the base "
                                f"model and {tuple(tuned_paths[path])} in the fine-tuned one")
    out: dict[str, LowRank] = {}
    results: list[LayerResult] = []
    paths = sorted(base_paths)
    for index, path in enumerate(paths):
        # a layer stored alike in both (a fine-tune or bake that left it alone) is skipped unread
        if not stored_equal(base, tuned, path + ".weight"):
            delta = tuned.tensor(path + ".weight") - base.tensor(path + ".weight")
            if torch.count_nonzero(delta):
                (down, up), error, _ = truncate_dense(delta, rule)
                out[path] = (down, up)
                results.append(LayerResult(path, down.shape[0], error))
            del delta
        if progress is not None:
            progress(index + 1, len(paths), path)
    other = set(base.names()) & set(tuned.names()) - {p + ".weight" for p in paths}
    differing = sorted(n for n in other if base.shape(n) == tuned.shape(n) and not stored_equal(base, tuned, n)
                       and not torch.equal(base.tensor(n), tuned.tensor(n)))
    if not out:
        raise LoraToolError("the two models have the same weights in every linear layer: nothing to extract")
    return out, results, differing


# --- reports and files --------------------------------------------------------------------------

def summary(results: Sequence[LayerResult], worst: int = 5) -> str:
    """A few lines for the node's text output: layers, ranks, mean and worst relative errors."""
    if not results:
        return "no layers"
    errors = [r.relative_error for r in results]
    ranks = sorted({r.rank for r in results})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    lines = [(f"{len(results)} layers, rank {rank_text}, relative error mean {sum(errors) / len(errors):.4g}, "
              f"max {max(errors):.4g}")]
    for r in sorted(results, key=lambda r: -r.relative_error)[:worst]:
        if r.relative_error > 0:
            lines.append(f"  {r.path}: rank {r.rank}, error {r.relative_error:.4g}")
    return "\n".join(lines)


def write_lora(path: str | os.PathLike[str], factors: Mapping[str, LowRank], dtype: torch.dtype = torch.float32,
               overwrite: bool = False, metadata: Mapping[str, str] | None = None) -> None:
    """Write kohya FLUX LoRA keys (`lora_unet_<module>.lora_down/lora_up.weight`, `.alpha` = rank,
    so scale 1) as a .safetensors, atomically; an existing file is refused unless `overwrite`."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    tensors = {}
    for module_path, (down, up) in factors.items():
        name = kohya_name(module_path)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(tensors, temporary, metadata=dict(metadata or {}))


def tool_metadata(operation: str, **details) -> dict[str, str]:
    """Header fields recording how a file was made (safetensors metadata is str -> str)."""
    return {"fluxq_workbench": json.dumps({"operation": operation, **details}, sort_keys=True)}
