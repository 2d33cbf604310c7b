"""Atomic outputs: built beside the target in a hidden scratch copy (``.<name>.tmp-*``), moved into place
only when complete, removed on every other exit but SIGKILL: the target never holds half an output."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; on success it replaces ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would become the output's mode
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing what is there; the old one is restored if the move fails."""
    if not (dst.exists() or dst.is_symlink()):
        src.rename(dst)
        return
    # A folder cannot be renamed over a non-empty one: the old output is moved aside first.
    backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    dst.rename(backup)
    try:
        src.rename(dst)
    except OSError:
        backup.rename(dst)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden file beside it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        tmp.chmod(0o666 & ~_umask())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
