"""Shards that must not be written in place: symlinks (into a Hugging Face cache's
``blobs/``), files with other hard links, files this user cannot write. Refused
before anything is written, or replaced by private copies on request."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from apollo_sync.errors import UnsafeShardError
from apollo_sync.model_dir import ModelDir


def check_shards(md: ModelDir, private_copy: bool, only: Collection[str] | None = None) -> ModelDir:
    """Refuses shards that must not be written in place, or replaces them by
    private copies when asked. Returns the directory to sync (re-read when a
    shard was replaced). ``only``: the file names to check (those this host
    writes, in a group); all by default."""
    headers = [h for h in md.headers if only is None or Path(h.path).name in only]
    shared: list[str] = []
    for h in headers:
        path = Path(h.path)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            shared.append(f"{path.name} is a symlink to {os.readlink(path)}")
        elif st.st_nlink > 1:
            shared.append(f"{path.name} has {st.st_nlink - 1} other hard link(s)")
    if shared and not private_copy:
        raise UnsafeShardError(
            f"{md.path}: writing in place would also change other copies of these shards "
            "(a Hugging Face cache blob, a hard-linked snapshot): "
            + "; ".join(shared[:5])
            + ". Nothing was written. Pass --private-copy to replace them by private "
            "copies first (a reflink where the filesystem supports it)."
        )
    for h in headers:
        path = Path(h.path)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or st.st_nlink > 1:
            _replace_by_copy(path)
    for h in headers:
        if not os.access(h.path, os.W_OK):
            raise UnsafeShardError(f"{h.path}: not writable by this user; nothing was written")
    return ModelDir.open(md.path) if shared else md


_FICLONE = 0x40049409


def _replace_by_copy(path: Path) -> None:
    """Replaces ``path`` (a symlink or a hard link) by a private copy of its bytes,
    atomically and durably: a reflink where the filesystem can, else a copy."""
    tmp = path.with_name(f".{path.name}.apollo_sync-copy")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        except OSError:
            shutil.copyfileobj(src, dst, 16 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
