"""Merge / resize / extract against their oracles: full rank reproduces the update to float
tolerance; lower ranks err by exactly the discarded singular values (Eckart-Young)."""

import math

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file

from lora_ops.gguf_write import write_gguf
from lora_ops.lora_formats import read_lora_file
from lora_ops.lora_runtime import KroneckerAdapter, LowRankAdapter
from lora_ops.lora_tools import (
    LoraToolError,
    RankRule,
    extract_lora,
    merge_layers,
    summary,
    truncate_dense,
    truncate_factors,
    write_lora,
)
from lora_ops.model_weights import ModelWeightsError, open_weights


def lora(rows, columns, rank, seed, scale=0.5, out_slice=None):
    g = torch.Generator().manual_seed(seed)
    part = rows if out_slice is None else out_slice[1]
    return LowRankAdapter(torch.randn(rank, columns, generator=g), torch.randn(part, rank, generator=g), scale,
                          out_slice=out_slice)


def full(adapter, rows):
    delta = adapter.dense_delta(torch.empty(0))
    if adapter.out_slice is None:
        return delta
    out = torch.zeros(rows, delta.shape[1])
    out[adapter.out_slice[0]:sum(adapter.out_slice)] = delta
    return out


SHAPES = {"double_blocks.0.img_attn.qkv": (48, 16), "single_blocks.0.linear2": (16, 40)}


def two_loras():
    a = {"double_blocks.0.img_attn.qkv": lora(48, 16, 4, 1), "single_blocks.0.linear2": lora(16, 40, 3, 2)}
    b = {"double_blocks.0.img_attn.qkv": lora(48, 16, 2, 3, out_slice=(16, 16))}  # a diffusers to_k
    return a, b


def test_exact_merge_concatenates_ranks_and_equals_the_weighted_sum():
    a, b = two_loras()
    layers = {p: [(0.8, a[p])] + ([(-1.5, b[p])] if p in b else []) for p in a}
    factors, results = merge_layers(layers, SHAPES)
    qkv_down, qkv_up = factors["double_blocks.0.img_attn.qkv"]
    assert qkv_down.shape[0] == 6
    expected = 0.8 * full(a["double_blocks.0.img_attn.qkv"], 48) - 1.5 * full(b["double_blocks.0.img_attn.qkv"], 48)
    torch.testing.assert_close(qkv_up @ qkv_down, expected, rtol=1e-5, atol=1e-5)
    assert all(r.relative_error == 0.0 for r in results)


def test_full_rank_truncation_reproduces_the_update():
    a, b = two_loras()
    layers = {"double_blocks.0.img_attn.qkv": [(1.0, a["double_blocks.0.img_attn.qkv"]),
                                               (1.0, b["double_blocks.0.img_attn.qkv"])]}
    factors, results = merge_layers(layers, SHAPES, RankRule(rank=16))
    down, up = factors["double_blocks.0.img_attn.qkv"]
    expected = full(a["double_blocks.0.img_attn.qkv"], 48) + full(b["double_blocks.0.img_attn.qkv"], 48)
    assert down.shape[0] == 6  # the update's own rank: 4 + 2
    torch.testing.assert_close(up @ down, expected, rtol=1e-5, atol=1e-5)
    assert results[0].relative_error < 1e-6


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lower_rank_error_is_the_discarded_singular_values(k):
    adapter = lora(48, 16, 5, 7)
    expected = full(adapter, 48).double()
    s = torch.linalg.svdvals(expected)
    (down, up), error, _ = truncate_factors(adapter.down, adapter.up * adapter.scale, RankRule(rank=k))
    eckart_young = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
    assert down.shape[0] == k
    assert error == pytest.approx(eckart_young, rel=1e-6)
    actual = float(torch.linalg.norm(up.double() @ down.double() - expected) / torch.linalg.norm(expected))
    assert actual == pytest.approx(eckart_young, rel=1e-5)
    # the same on the dense path
    (down2, up2), error2, _ = truncate_dense(expected.float(), RankRule(rank=k))
    assert error2 == pytest.approx(eckart_young, rel=1e-6)
    torch.testing.assert_close(up2 @ down2, up @ down, rtol=1e-4, atol=1e-4)


def test_kept_fraction_picks_the_fewest_triplets_reaching_it():
    u, _ = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    delta = (u * s) @ v.T
    kept = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())  # 0.87, 0.976, 0.997, 1
    for fraction, rank in ((0.5, 1), (0.9, 2), (float(kept[1]), 2), (0.99, 3), (1.0, 4)):
        (down, _), _, _ = truncate_dense(delta, RankRule(rank=64, kept_fraction=fraction))
        assert down.shape[0] == rank, fraction
    (down, _), _, _ = truncate_dense(delta.float(), RankRule(rank=2, kept_fraction=0.999))
    assert down.shape[0] == 2  # rank caps the fraction rule


def test_lokr_merges_to_a_rank_but_not_exactly():
    g = torch.Generator().manual_seed(0)
    lokr = KroneckerAdapter(torch.randn(4, 2, generator=g), torch.randn(4, 8, generator=g), scale=1.0)
    shapes = {"single_blocks.0.linear2": (16, 16)}
    with pytest.raises(LoraToolError, match="single_blocks.0.linear2.*KroneckerAdapter"):
        merge_layers({"single_blocks.0.linear2": [(1.0, lokr)]}, shapes)
    factors, _ = merge_layers({"single_blocks.0.linear2": [(1.0, lokr)]}, shapes, RankRule(rank=16))
    down, up = factors["single_blocks.0.linear2"]
    torch.testing.assert_close(up @ down, lokr.dense_delta(torch.empty(0)), rtol=1e-4, atol=1e-4)


def test_bad_rules_and_empty_merges_are_refused():
    with pytest.raises(LoraToolError, match="rank"):
        RankRule(rank=0)
    with pytest.raises(LoraToolError, match="fraction"):
        RankRule(rank=4, kept_fraction=1.5)
    with pytest.raises(LoraToolError, match="weight 0"):
        merge_layers({"single_blocks.0.linear2": [(0.0, lora(16, 40, 2, 0))]}, SHAPES)


def test_written_file_reads_back_as_kohya_with_alpha_equal_to_rank(tmp_path):
    a, _ = two_loras()
    factors, results = merge_layers({p: [(1.0, x)] for p, x in a.items()}, SHAPES)
    path = tmp_path / "merged.safetensors"
    write_lora(path, factors, metadata={"note": "x"})
    sd = read_lora_file(path)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert float(sd[f"{name}.alpha"]) == 4.0
    torch.testing.assert_close(sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"],
                               full(a["double_blocks.0.img_attn.qkv"], 48), rtol=1e-5, atol=1e-5)
    assert "2 layers" in summary(results)
    with pytest.raises(FileExistsError, match="merged.safetensors"):
        write_lora(path, factors)
    write_lora(path, factors, dtype=torch.bfloat16, overwrite=True)
    assert load_file(str(path))[f"{name}.lora_up.weight"].dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no temporary left


def test_a_full_disk_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from lora_ops.atomic import DiskFullError

    a, _ = two_loras()
    factors, _ = merge_layers({p: [(1.0, x)] for p, x in a.items()}, SHAPES)
    path = tmp_path / "merged.safetensors"
    path.write_bytes(b"user data")

    def half_then_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(DiskFullError, match=r"merged\.safetensors: [0-9.]+ MiB free .*is unchanged"):
        write_lora(path, factors, overwrite=True)
    assert path.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


def models(tmp_path, rank=3):
    """A base (GGUF, F32 tensors) and a fine-tune (safetensors, core's prefix) differing by a rank-3 update."""
    g = torch.Generator().manual_seed(5)
    base = {"double_blocks.0.img_attn.qkv.weight": torch.randn(24, 32, generator=g),
            "double_blocks.0.img_attn.qkv.bias": torch.randn(24, generator=g),
            "single_blocks.0.linear2.weight": torch.randn(32, 64, generator=g)}
    update = torch.randn(24, rank, generator=g) @ torch.randn(rank, 32, generator=g)
    tuned = dict(base) | {"double_blocks.0.img_attn.qkv.weight": base["double_blocks.0.img_attn.qkv.weight"] + update,
                          "double_blocks.0.img_attn.qkv.bias": base["double_blocks.0.img_attn.qkv.bias"] + 1}
    write_gguf(tmp_path / "base.gguf", {k: v.numpy() for k, v in base.items()}, lambda n, a: QType.F32)
    save_file({"model.diffusion_model." + k: v for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.gguf", tmp_path / "tuned.safetensors", update


def test_extraction_from_a_gguf_and_a_checkpoint(tmp_path):
    base, tuned, update = models(tmp_path)
    seen = []
    factors, _, differing = extract_lora(open_weights(base), open_weights(tuned), RankRule(rank=8),
                                        progress=lambda i, n, p: seen.append((i, n)))
    assert list(factors) == ["double_blocks.0.img_attn.qkv"]  # linear2 did not change
    down, up = factors["double_blocks.0.img_attn.qkv"]
    assert down.shape[0] == 8
    torch.testing.assert_close(up @ down, update, rtol=1e-4, atol=1e-4)
    assert differing == ["double_blocks.0.img_attn.qkv.bias"]
    assert seen[-1] == (2, 2)
    _, results2, _ = extract_lora(open_weights(base), open_weights(tuned), RankRule(rank=2))
    s = torch.linalg.svdvals(update.double())
    assert results2[0].relative_error == pytest.approx(math.sqrt(float(s[2:] @ s[2:] / (s @ s))), rel=1e-5)


def test_layers_stored_alike_are_not_read(tmp_path):
    """A bake or fine-tune that leaves layers alone: those are compared by their stored bytes, never
    dequantized (a real model's extraction reads only what changed); the changed one is found."""
    base, _, update = models(tmp_path)
    weights = {n: open_weights(base).tensor(n) for n in open_weights(base).names()}
    weights["double_blocks.0.img_attn.qkv.weight"] += update
    write_gguf(tmp_path / "tuned.gguf", {k: v.numpy() for k, v in weights.items()}, lambda n, a: QType.F32)
    base_weights, tuned_weights = open_weights(base), open_weights(tmp_path / "tuned.gguf")
    read = []
    for source in (base_weights, tuned_weights):
        source.tensor = lambda name, read_one=source.tensor: read.append(name) or read_one(name)
    factors, _, differing = extract_lora(base_weights, tuned_weights, RankRule(rank=3))
    assert list(factors) == ["double_blocks.0.img_attn.qkv"] and differing == []
    assert sorted(set(read)) == ["double_blocks.0.img_attn.qkv.weight"]


def test_extraction_refuses_models_of_different_families(tmp_path):
    base, _, _ = models(tmp_path)
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 16),
               "single_blocks.0.linear2.weight": torch.zeros(32, 64)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraToolError, match=r"double_blocks.0.img_attn.qkv.weight is \(24, 32\).*\(24, 16\)"):
        extract_lora(open_weights(base), open_weights(tmp_path / "other.safetensors"), RankRule(rank=2))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 32)}, str(tmp_path / "fewer.safetensors"))
    with pytest.raises(LoraToolError, match="single_blocks.0.linear2.*only in the base"):
        extract_lora(open_weights(base), open_weights(tmp_path / "fewer.safetensors"), RankRule(rank=2))
    with pytest.raises(LoraToolError, match="nothing to extract"):
        extract_lora(open_weights(base), open_weights(base), RankRule(rank=2))


def test_open_weights_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04pickle")
    with pytest.raises(ModelWeightsError, match="model.ckpt.*pickled"):
        open_weights(tmp_path / "model.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelWeightsError, match="bad.safetensors"):
        open_weights(tmp_path / "bad.safetensors")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(ModelWeightsError, match="bad.gguf"):
        open_weights(tmp_path / "bad.gguf")
    save_file({"step": torch.tensor([1])}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ModelWeightsError, match="no floating-point"):
        open_weights(tmp_path / "ints.safetensors")
