"""Exponential moving average of the LoRA factors (no ComfyUI imports).

After every optimizer step `ema = decay * ema + (1 - decay) * weight`, starting from the weights
the run starts with (ai-toolkit's FLUX recipes use decay 0.99-0.999). The average is what gets
saved as the LoRA; the raw weights stay in the train-state so a resumed run continues both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class WeightEMA:
    """An fp32 shadow copy of named tensors, updated in place after each optimizer step."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float,
                 shadow: Mapping[str, torch.Tensor] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay {decay} must be between 0 and 1 (0 turns EMA off)")
        self.decay = decay
        start = shadow if shadow is not None else params
        missing = sorted(set(params) - set(start))
        if missing:
            raise ValueError(f"the saved EMA has no weights for {', '.join(missing[:3])}")
        self.shadow = {name: start[name].detach().to(params[name].device, torch.float32, copy=True)
                       for name in params}

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor]) -> None:
        for name, weight in params.items():
            # lerp: shadow + (1 - decay) * (weight - shadow), the same average in one kernel
            self.shadow[name].lerp_(weight.detach().float(), 1.0 - self.decay)


def closed_form_ema(start: torch.Tensor, weights: Sequence[torch.Tensor], decay: float) -> torch.Tensor:
    """decay^n * start + (1 - decay) * sum_k decay^(n-k) * weights[k-1]: the EMA after n updates
    written out, in float64 (the oracle the step-by-step update is tested against)."""
    n = len(weights)
    total = start.double() * decay**n
    for k, weight in enumerate(weights, start=1):
        total = total + (1.0 - decay) * decay ** (n - k) * weight.double()
    return total
