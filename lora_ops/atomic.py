"""Files that appear whole or not at all: written under a hidden temporary name in the same
folder, then renamed (a rename within one folder is atomic)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields ``.<name>.<pid>.tmp`` beside ``path`` to write to; renamed to ``path`` when the block
    ends without an error, removed when it raises. A killed process leaves only the hidden name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
