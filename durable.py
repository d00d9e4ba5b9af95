"""fsync of a file or a folder: what makes a write, or a rename into a folder, survive a
power cut (the page cache survives only the process). One definition for the meter's
state and outbox and the database backups."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a new name, a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
