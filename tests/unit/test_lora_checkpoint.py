import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_ops import lora_checkpoint as ckpt
from lora_ops.flow_match import TrainState

PATHS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1",
         "single_blocks.0.modulation.lin"]


def factors(rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {p: ckpt.LoraFactors(torch.randn(rank, 32, generator=gen), torch.randn(48, rank, generator=gen))
            for p in PATHS}


def meta(**kw):
    args = dict(base_model="flux-tiny.gguf", rank=4, alpha=4.0, steps=3, trigger_word="TOK",
                image_count=2, resolution=64, run_id="run-a")
    args.update(kw)
    return ckpt.lora_metadata(**args)


def test_saves_kohya_names_alpha_and_metadata(tmp_path):
    path = str(tmp_path / "my.safetensors")
    ckpt.save_checkpoint(path, factors(), 2.0, meta())
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        md = f.metadata()
        assert f.get_tensor("lora_unet_single_blocks_0_modulation_lin.alpha").item() == 2.0
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_txt_mlp_0.lora_up.weight" in keys
    assert len(keys) == 3 * len(PATHS)
    assert md["ss_network_dim"] == "4" and md["ss_steps"] == "3" and md["modelspec.trigger_phrase"] == "TOK"
    assert md["ss_sd_model_name"] == "flux-tiny.gguf" and md["ss_num_train_images"] == "2"
    assert md["ss_resolution"] == "(64, 64)" and md["fluxq_format"] == "kohya" and md["fluxq_run_id"] == "run-a"
    assert ckpt.run_id_of(path) == "run-a"
    assert not os.path.exists(ckpt.state_path_for(path))
    assert os.listdir(tmp_path) == ["my.safetensors"]


def test_round_trip_maps_kohya_names_back_to_module_paths(tmp_path):
    path = str(tmp_path / "rt.safetensors")
    saved = factors()
    ckpt.save_checkpoint(path, saved, 4.0, meta())
    loaded, alpha, md = ckpt.load_checkpoint(path, PATHS + ["double_blocks.0.img_attn.proj"])
    assert alpha == 4.0 and md["ss_steps"] == "3"
    assert set(loaded) == set(PATHS)
    for p in PATHS:
        assert torch.equal(loaded[p].down, saved[p].down) and torch.equal(loaded[p].up, saved[p].up)


def test_loading_into_a_model_without_the_module_names_it(tmp_path):
    path = str(tmp_path / "rt.safetensors")
    ckpt.save_checkpoint(path, factors(), 4.0, meta())
    with pytest.raises(ckpt.CheckpointError, match="lora_unet_single_blocks_0_linear1"):
        ckpt.load_checkpoint(path, PATHS[:2] + PATHS[3:])


def test_foreign_files_are_refused_clearly(tmp_path):
    empty = str(tmp_path / "empty.safetensors")
    save_file({"x": torch.zeros(1)}, empty)
    with pytest.raises(ckpt.CheckpointError, match="no kohya"):
        ckpt.load_checkpoint(empty, PATHS)
    mixed = str(tmp_path / "mixed.safetensors")
    sd = {}
    for i, p in enumerate(PATHS[:2]):
        base = "lora_unet_" + p.replace(".", "_")
        sd.update({f"{base}.lora_down.weight": torch.zeros(2, 3), f"{base}.lora_up.weight": torch.zeros(3, 2),
                   f"{base}.alpha": torch.tensor(float(i + 1))})
    save_file(sd, mixed)
    with pytest.raises(ckpt.CheckpointError, match="mixes alphas"):
        ckpt.load_checkpoint(mixed, PATHS)


def _adam_state():
    params = {f"{p}.lora_down": torch.nn.Parameter(torch.randn(4, 8)) for p in PATHS[:2]}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    sum((p ** 2).sum() for p in params.values()).backward()
    opt.step()
    names = {id(p): n for n, p in params.items()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def test_train_state_round_trips_without_pickle(tmp_path):
    path = str(tmp_path / "run.safetensors")
    state = TrainState(step=7, loss_history=[0.5, 0.25, 0.125], optimizer_state=_adam_state())
    ckpt.save_checkpoint(path, factors(), 4.0, meta(), state, {"optimizer": "adamw", "seed": 3})
    state_path = ckpt.state_path_for(path)
    assert state_path.endswith("run.trainstate")
    with open(state_path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        json.loads(f.read(header_len))  # a safetensors header: plain JSON, no pickle anywhere
    loaded, info = ckpt.load_train_state(path)
    assert loaded.step == 7 and loaded.loss_history == [0.5, 0.25, 0.125]
    assert info == {"optimizer": "adamw", "seed": 3}
    assert set(loaded.optimizer_state) == set(state.optimizer_state)
    for name, values in state.optimizer_state.items():
        assert set(loaded.optimizer_state[name]) == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in values.items():
            assert torch.equal(loaded.optimizer_state[name][k], v)


def test_resume_without_state_file_is_refused(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    ckpt.save_checkpoint(path, factors(), 4.0, meta())
    with pytest.raises(ckpt.CheckpointError, match="no plain.trainstate"):
        ckpt.load_train_state(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "keep.safetensors")
    ckpt.save_checkpoint(path, factors(seed=1), 4.0, meta())
    before = open(path, "rb").read()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, factors(seed=2), 4.0, meta())
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_keep_last_prunes_oldest_step_checkpoints_and_their_states(tmp_path):
    state = TrainState(step=1)
    for step in (100, 200, 300, 1000):
        ckpt.save_checkpoint(str(tmp_path / ckpt.step_checkpoint_name("run", step)), factors(), 4.0, meta(), state)
    ckpt.save_checkpoint(str(tmp_path / ckpt.step_checkpoint_name("run_v2", 50)), factors(), 4.0, meta(), state)
    ckpt.save_checkpoint(str(tmp_path / "run.safetensors"), factors(), 4.0, meta(), state)
    deleted = ckpt.prune_step_checkpoints(str(tmp_path), "run", keep_last=2, run_id="run-a")
    assert sorted(os.path.basename(p) for p in deleted) == ["run_step000100.safetensors", "run_step000200.safetensors"]
    assert sorted(os.listdir(tmp_path)) == sorted([
        "run_step000300.safetensors", "run_step000300.trainstate",
        "run_step001000.safetensors", "run_step001000.trainstate",
        "run_v2_step000050.safetensors", "run_v2_step000050.trainstate",
        "run.safetensors", "run.trainstate",
    ])
    assert ckpt.prune_step_checkpoints(str(tmp_path), "run", keep_last=0, run_id="run-a") == []


def test_pruning_keeps_other_runs_files_and_a_new_run_sees_them_as_another_runs(tmp_path):
    """Run 1 (steps 2 and 4 kept) then run 2 under the same name saving step 1: keep_last 2 must
    keep run 2's step 1, not prefer run 1's higher step numbers."""
    state = TrainState(step=1)
    for step in (2, 4):
        ckpt.save_checkpoint(str(tmp_path / ckpt.step_checkpoint_name("run", step)), factors(), 4.0, meta(), state)
    ckpt.save_checkpoint(str(tmp_path / "run.safetensors"), factors(), 4.0, meta(), state)
    (tmp_path / "run_step000009.safetensors").write_bytes(b"not a safetensors file")  # another tool's, or broken
    assert [os.path.basename(p) for p in ckpt.other_runs_files(str(tmp_path), "run", "run-a")] == [
        "run_step000009.safetensors"]
    assert [os.path.basename(p) for p in ckpt.other_runs_files(str(tmp_path), "run", "run-b")] == [
        "run_step000002.safetensors", "run_step000004.safetensors", "run_step000009.safetensors", "run.safetensors"]

    second = str(tmp_path / ckpt.step_checkpoint_name("run", 1))
    ckpt.save_checkpoint(second, factors(), 4.0, meta(run_id="run-b"), state)
    assert ckpt.prune_step_checkpoints(str(tmp_path), "run", keep_last=2, run_id="run-b") == []
    assert os.path.exists(second) and os.path.exists(ckpt.state_path_for(second))
    assert [os.path.basename(p) for p in ckpt.prune_step_checkpoints(str(tmp_path), "run", 1, "run-a")] == [
        "run_step000002.safetensors"]
    assert os.path.exists(second) and os.path.exists(tmp_path / "run_step000009.safetensors")

    ckpt.delete_checkpoint(second)
    assert not os.path.exists(second) and not os.path.exists(ckpt.state_path_for(second))


def test_metadata_names_the_family_member_from_the_registry():
    from lora_ops.flux_family import BY_ID

    klein = BY_ID["flux2-klein-4b"]
    md = meta(base_model=klein.base_model, base_model_version=klein.base_model_version,
              network_module=klein.network_module)
    assert md["ss_sd_model_name"] == "flux2-klein-4b" and md["ss_base_model_version"] == "flux2"
    assert md["ss_network_module"] == "networks.lora_flux_2"  # musubi-tuner's FLUX.2 module
    # callers that name no member: FLUX.1, as before
    assert meta()["ss_base_model_version"] == "flux1" and meta()["ss_network_module"] == "networks.lora_flux"
