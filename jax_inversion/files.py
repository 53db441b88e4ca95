"""Writing files so that a failure or a refusal never damages what is already on disk."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None], *, overwrite: bool, exists_error: type = FileExistsError) -> str:
    """Calls ``write(tmp)`` on a temp file beside ``path``, then renames it over ``path``.

    An existing ``path`` without ``overwrite`` raises ``exists_error`` naming the fix.
    """
    if os.path.exists(path) and not overwrite:
        raise exists_error(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users (a UI's service)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
