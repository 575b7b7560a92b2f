"""Files that appear whole or not at all: written under a hidden temporary name in the same
folder, then renamed (a rename within one folder is atomic)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

from .errors import user_facing

_FULL = (errno.ENOSPC, errno.EDQUOT)


@user_facing
class DiskFullError(OSError):
    """No room for a file the pack writes; the message names the file, its folder and the free space.
    An OSError (errno ENOSPC), so handlers of the original error still catch it."""

    def __init__(self, path: str, needed: int | None = None):
        folder = os.path.dirname(os.path.abspath(path))
        need = "" if needed is None else f"it needs {needed / 2**20:.1f} MiB, "
        super().__init__(errno.ENOSPC, f"not enough disk space to write {path}: {need}{free_space(folder)} in "
                                       f"{folder}; nothing was written (an existing file of that name is unchanged)")


def free_space(folder: str) -> str:
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"


def check_space(path: str, needed: int) -> None:
    """Refuse before writing when `needed` bytes do not fit beside `path` (the old file, if any,
    stays until the new one is complete, so its space does not count)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if shutil.disk_usage(folder).free < needed:
        raise DiskFullError(path, needed)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields ``.<name>.<pid>.tmp`` beside ``path`` to write to; renamed to ``path`` when the block
    ends without an error, removed when it raises. A killed process leaves only the hidden name.
    A full disk (ENOSPC, EDQUOT) raises ``DiskFullError`` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        if error.errno in _FULL and not isinstance(error, DiskFullError):
            with contextlib.suppress(OSError):
                os.remove(temporary)  # first, so the free space reported counts its bytes back
            raise DiskFullError(path) from error
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
