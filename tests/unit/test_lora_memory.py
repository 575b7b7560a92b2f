"""Memory the pack holds outside ComfyUI's view: the per-(device, dtype) casts of LoRA factors
(a stack's LayerLoras) live only as long as the stack that owns them. Hooks stay on the modules
but hold only a module path; the LayerLoras `activate` sets on a module are taken off after each
call. So applying, using and dropping N different LoRAs leaves nothing behind."""

import gc
import weakref

import torch
from torch import nn

from lora_ops.lora_runtime import LoraEntry, LoraStack, LowRankAdapter, activate, active_loras, install_hooks


def test_casts_of_dropped_loras_are_freed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    paths = ("0", "1")
    x = torch.randn(4, 64, dtype=torch.bfloat16)  # a dtype other than the fp32 masters: casts are made
    model = model.to(torch.bfloat16)
    baseline = model(x)
    cast_refs, entry_refs = [], []
    for n in range(20):  # N different LoRAs applied, used and dropped one after the other
        adapters = {p: (LowRankAdapter(torch.randn(4, m.in_features), torch.randn(m.out_features, 4), 0.5),)
                    for p, m in zip(paths, model)}
        entry = LoraEntry(f"lora{n}", 1.0, adapters)
        stack = LoraStack([entry])
        install_hooks(model, stack.module_paths())
        with activate(stack, x.device, x.dtype):
            assert not torch.equal(model(x), baseline)
            casts = [t for m in model for t in (active_loras(m).down_c, active_loras(m).up_c)]
        assert len(casts) == 4 and all(t.dtype == torch.bfloat16 for t in casts)  # down and up of both layers
        cast_refs += [weakref.ref(t) for t in casts]
        entry_refs.append(weakref.ref(entry))
        del stack, entry, adapters, casts
    gc.collect()
    assert all(ref() is None for ref in entry_refs), "a LoRA outlived its stack"
    assert all(ref() is None for ref in cast_refs), "cast LoRA factors outlived their LoRA"
    assert torch.equal(model(x), baseline)  # the hooks left behind are inert
