"""On-disk cache of a training set's encoded latents and caption embeddings (no ComfyUI imports).

An entry's key is a hash of everything its value depends on: a latent's of the image's pixels,
the bucket it is fitted to and the VAE's identity; an embedding's of the caption text and the
text encoders' identity. A changed image or model therefore finds no entry and is encoded again;
the same inputs in a later run are read back instead of encoded. Entries are safetensors (loading
one never runs code), written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from .lora_checkpoint import atomic_save_safetensors

log = logging.getLogger("fluxq")

# Part of every key: raise it when what an entry holds changes meaning.
CACHE_FORMAT = "fluxq-latent-cache-1"
# Values read from each tensor for a model's identity: enough to tell fine-tunes apart (they change
# every tensor), few enough that a 9 GB text encoder is identified in well under a second.
SAMPLES_PER_TENSOR = 256


def model_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A model's identity: every tensor's name, shape and dtype and an evenly strided sample of
    its values (raw bytes: quantized tensors are hashed as stored)."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for name, tensor in named_tensors:
        plain = tensor.detach().as_subclass(torch.Tensor)
        digest.update(f"{name}|{tuple(plain.shape)}|{plain.dtype}|".encode())
        flat = plain.reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            digest.update(flat[::step][:SAMPLES_PER_TENSOR].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_digest(image: Image.Image) -> str:
    """The decoded pixels' hash (a re-saved file with the same pixels keeps its entry)."""
    digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_FORMAT, *parts))).encode()).hexdigest()


@dataclass
class CacheCounts:
    latents_reused: int = 0
    latents_encoded: int = 0
    embeddings_reused: int = 0
    embeddings_encoded: int = 0

    def __str__(self) -> str:
        return (f"latents {self.latents_reused} reused / {self.latents_encoded} encoded, "
                f"caption embeddings {self.embeddings_reused} reused / {self.embeddings_encoded} encoded")


class LatentCache:
    """Latents under `<folder>/latents`, embeddings under `<folder>/embeddings`, one file each.
    A `text_encoder_identity` of None (encoders without a stable identity) caches no embedding."""

    def __init__(self, folder: str, vae_identity: str, text_encoder_identity: str | None):
        self.folder = folder
        self.vae_identity, self.text_encoder_identity = vae_identity, text_encoder_identity
        self.counts = CacheCounts()

    def latent(self, image: Image.Image, bucket: tuple[int, int], encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The VAE latent of `image` fitted to `bucket` ((width, height)), from the cache or `encode()`."""
        path = os.path.join(self.folder, "latents", _key(self.vae_identity, image_digest(image), bucket) + ".safetensors")
        cached = self._read(path, ("latent",))
        if cached is not None:
            self.counts.latents_reused += 1
            return cached["latent"]
        latent = encode().float().cpu().contiguous()
        atomic_save_safetensors({"latent": latent}, {}, path)
        self.counts.latents_encoded += 1
        return latent

    def embedding(self, text: str, encode: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled) of a caption, from the cache or `encode()`; pooled is None for encoders
        without one (T5 alone, the FLUX.2 LLMs)."""
        def to_cpu(t):
            return None if t is None else t.float().cpu().contiguous()

        if self.text_encoder_identity is None:
            self.counts.embeddings_encoded += 1
            return tuple(to_cpu(t) for t in encode())
        path = os.path.join(self.folder, "embeddings", _key(self.text_encoder_identity, text) + ".safetensors")
        cached = self._read(path, ("context",))
        if cached is not None:
            self.counts.embeddings_reused += 1
            return cached["context"], cached.get("pooled")
        context, pooled = (to_cpu(t) for t in encode())
        atomic_save_safetensors({"context": context, **({} if pooled is None else {"pooled": pooled})}, {}, path)
        self.counts.embeddings_encoded += 1
        return context, pooled

    @staticmethod
    def _read(path: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        if not os.path.isfile(path):
            return None
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as error:  # a damaged entry is encoded again and replaced
            log.warning("FluxQ latent cache: ignoring unreadable %s (%s)", path, error)
            return None
        if not set(keys) <= set(tensors):
            log.warning("FluxQ latent cache: ignoring %s: it has no %s", path, ", ".join(keys))
            return None
        return tensors
