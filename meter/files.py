"""Crash-safe small-file writes shared by the seq state and the outbox."""

from __future__ import annotations

import os
from pathlib import Path

from meterproof.durable import fsync_path


def atomic_write(path: Path, data: bytes, *, durable: bool) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    The rename alone survives a process crash (the page cache outlives the process);
    `durable` adds the fsyncs that make it survive a power cut too, as firmware must.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    tmp.replace(path)
    if durable:
        fsync_path(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` may write less than asked (a full disk, a file size limit) without an
    error; the next call raises instead, so a short file is never renamed into place."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
