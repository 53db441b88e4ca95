"""Writing files so that a failure or a refusal never damages what is already on disk."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

from etils import epath


def is_remote(path) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/...``) read and written through :mod:`etils.epath`."""
    return "://" in str(path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """``path`` itself when local, else a temporary local copy of the remote file (for readers that need a file name)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, epath.Path(path).name)
        with epath.Path(path).open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


def atomic_write(path: str, write: Callable[[str], None], *, overwrite: bool, exists_error: type = FileExistsError) -> str:
    """Calls ``write(tmp)`` on a temp file beside ``path``, then renames it over ``path``.

    An existing ``path`` without ``overwrite`` raises ``exists_error`` naming the fix.
    """
    if is_remote(path):  # an object store: the upload appears whole or not at all
        target = epath.Path(path)
        if target.exists() and not overwrite:
            raise exists_error(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
        with tempfile.TemporaryDirectory() as directory:
            tmp = os.path.join(directory, "upload" + os.path.splitext(path)[1])
            write(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        return path
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


def tensors_sha256(tensors) -> str:
    """modelspec's ``hash_sha256`` of ``{name: numpy array}``: sha256 of the safetensors data section (the tensors'
    bytes, not the header, so metadata does not change it), ``0x``-prefixed."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return "0x" + hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little") :]).hexdigest()
