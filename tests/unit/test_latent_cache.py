import os

import pytest
import torch
from lora_ops.latent_cache import LatentCache, image_digest, model_fingerprint
from PIL import Image


class Encoder:
    """Counts its calls; the 'latent' is a function of the image, so a wrong entry would show."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image, scale=1.0):
        self.calls += 1
        return torch.tensor(list(image.getpixel((0, 0))), dtype=torch.float32) * scale


def test_entries_are_reused_and_any_changed_input_is_encoded_again(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 200))
    encode = Encoder()
    first = LatentCache(str(tmp_path), "vae-a", "te-a")
    assert torch.equal(first.latent(red, (64, 64), lambda: encode(red)), encode(red))
    first.latent(blue, (64, 64), lambda: encode(blue))
    assert (first.counts.latents_encoded, first.counts.latents_reused) == (2, 0)

    again = LatentCache(str(tmp_path), "vae-a", "te-a")  # a later run
    calls = encode.calls
    assert torch.equal(again.latent(red, (64, 64), lambda: encode(red)), torch.tensor([200.0, 0, 0]))
    assert encode.calls == calls and again.counts.latents_reused == 1

    touched = red.copy()
    touched.putpixel((3, 3), (201, 0, 0))
    for cache, image, bucket in ((again, touched, (64, 64)), (again, red, (64, 48)),
                                 (LatentCache(str(tmp_path), "vae-b", "te-a"), red, (64, 64))):
        before = cache.counts.latents_encoded
        cache.latent(image, bucket, lambda: encode(image, 2.0))
        assert cache.counts.latents_encoded == before + 1
    # no temporary file is left behind
    assert not [f for f in os.listdir(tmp_path / "latents") if not f.endswith(".safetensors")]


def test_embeddings_are_keyed_by_text_and_text_encoder(tmp_path):
    context, pooled = torch.randn(3, 4), torch.randn(4)
    cache = LatentCache(str(tmp_path), "vae", "te-a")
    assert cache.embedding("a red square", lambda: (context, pooled))[0].shape == (3, 4)
    got = LatentCache(str(tmp_path), "vae", "te-a").embedding("a red square", lambda: pytest.fail("re-encoded"))
    assert torch.equal(got[0], context) and torch.equal(got[1], pooled)
    other = LatentCache(str(tmp_path), "vae", "te-b")
    other.embedding("a red square", lambda: (context, pooled))
    other.embedding("a blue square", lambda: (context, pooled))
    assert other.counts.embeddings_encoded == 2 and other.counts.embeddings_reused == 0


def test_a_damaged_entry_is_encoded_again(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    LatentCache(str(tmp_path), "v", "t").latent(image, (8, 8), lambda: torch.ones(2))
    (entry,) = (tmp_path / "latents").iterdir()
    entry.write_bytes(b"\x00" * 5)
    cache = LatentCache(str(tmp_path), "v", "t")
    assert torch.equal(cache.latent(image, (8, 8), lambda: torch.zeros(2)), torch.zeros(2))
    assert cache.counts.latents_encoded == 1


def test_fingerprint_tells_models_apart_by_values_shapes_and_names_and_image_digest_by_pixels():
    weights = {"a": torch.randn(64, 64), "b": torch.randn(10)}
    same = model_fingerprint(weights.items())
    assert same == model_fingerprint({k: v.clone() for k, v in weights.items()}.items())
    tuned = {"a": weights["a"] + 1e-3, "b": weights["b"]}
    assert model_fingerprint(tuned.items()) != same
    assert model_fingerprint({"c": weights["a"], "b": weights["b"]}.items()) != same
    assert model_fingerprint({"a": weights["a"].to(torch.bfloat16), "b": weights["b"]}.items()) != same
    a = Image.new("RGB", (4, 4), (9, 9, 9))
    assert image_digest(a) == image_digest(a.copy()) != image_digest(Image.new("RGB", (4, 4), (9, 9, 10)))
