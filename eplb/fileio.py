"""Atomic file writes: a reader sees the old complete file or the new complete file, never a mix.

The new content goes to a temporary file in the target's own folder (so ``os.replace`` is a
rename within one file system, which POSIX makes atomic), is flushed and ``fsync``-ed, and then
replaces the target; the folder is ``fsync``-ed too so the rename itself survives a power cut.
A process killed mid-write leaves the target untouched and, at worst, a hidden
``.<name>.*.tmp`` file beside it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def _open_temp(target: Path) -> tuple[int, Path]:
    """A new, exclusively created temporary file beside ``target``: (fd, path).

    ``os.open`` with mode 0o666 lets the umask decide the permissions, as for a normal file
    (``tempfile.mkstemp`` would make it 0o600).
    """
    for _ in range(100):
        temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace the file at ``path`` by ``data`` atomically.

    Args:
        path: target file; its folder must exist. An existing file keeps its permissions.
        data: the complete new content.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: the folder is missing or not writable, the disk is full, ... The target is then
            unchanged and the temporary file removed.
    """
    target = Path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    fd, temp = _open_temp(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(handle.fileno(), os.stat(target).st_mode & 0o7777)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace the file at ``path`` by ``text`` (encoded with ``encoding``) atomically.

    See :func:`atomic_write_bytes`; returns ``path`` as a ``Path``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))
