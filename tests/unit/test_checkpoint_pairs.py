"""A LoRA and its .trainstate are one checkpoint: a save killed between the two writes (state
first, then LoRA) must not resume the old LoRA with the new state."""

import pytest
import torch

from lora_ops import lora_checkpoint as ckpt
from lora_ops.flow_match import TrainState

META = ckpt.lora_metadata(base_model="tiny", rank=2, alpha=2.0, steps=1, trigger_word="TOK", image_count=1, run_id="run1",
                          resolution=64)


def save(path, step):
    factors = {"single_blocks.0.linear2": ckpt.LoraFactors(torch.full((2, 8), float(step)), torch.zeros(4, 2))}
    ckpt.save_checkpoint(str(path), factors, 2.0, META, TrainState(step, [1.0] * step, {}), {"rank": 2})


def test_a_state_newer_than_its_lora_is_refused(tmp_path):
    lora = tmp_path / "run.safetensors"
    save(lora, 1)
    assert ckpt.load_train_state(str(lora))[0].step == 1
    old_lora = lora.read_bytes()
    save(lora, 2)
    lora.write_bytes(old_lora)  # as if killed after the state's rename, before the LoRA's
    with pytest.raises(ckpt.CheckpointError, match="run.safetensors: its run.trainstate is from another save"):
        ckpt.load_train_state(str(lora))
