"""Key encoding and the only way PKI files reach the disk.

A private key file is created with mode 0600 by `os.open` itself, so it never exists, even
for a moment, with looser permissions; every directory is created 0700. An identity's
files are written into a staging directory and published by one rename, so a crash leaves
either a complete identity or none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)

from meterproof.certs.errors import SharedKeyError

PRIVATE_FILE_MODE: Final = 0o600
PUBLIC_FILE_MODE: Final = 0o644
DIR_MODE: Final = 0o700


def private_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8: the files' protection is their mode, as for Mosquitto's keys."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_private_dir(path: Path) -> None:
    """Like `mkdir -p -m 0700`: `os.makedirs` applies its mode to the last component only."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=DIR_MODE)


def write_new_file(path: Path, data: bytes, *, mode: int) -> None:
    """Create `path` with `mode` from the first byte on; an existing file is an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def refuse_shared(path: Path, mode: int) -> None:
    """SharedKeyError when `mode`, a private key file's, opens it to its group or others."""
    if mode & 0o077:
        raise SharedKeyError(
            f"has mode {mode & 0o777:04o}: its group or others have access to it;"
            f" `chmod 600 {path}` if no one else can have read it"
        )


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created 0600, never removed): a
    read-decide-write that two processes or threads may run at once runs one at a time."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, mode: int = PUBLIC_FILE_MODE) -> None:
    """Readers (the broker reloading its CRL) see the old file or the new one, never half."""
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write_new_file(tmp, data, mode=mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_directory(
    final: Path,
    staging: Path,
    *,
    public: Mapping[str, bytes],
    private: Mapping[str, bytes],
) -> None:
    """Write the files under `staging`, then rename the whole directory to `final`.

    Raises FileExistsError if `final` exists, including when another process published it
    first: the rename onto a non-empty directory fails instead of merging.
    """
    if final.exists():
        raise FileExistsError(errno.EEXIST, "already exists", str(final))
    make_private_dir(staging)
    make_private_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=staging))
    try:
        for name, data in private.items():
            write_new_file(tmp / name, data, mode=PRIVATE_FILE_MODE)
        for name, data in public.items():
            write_new_file(tmp / name, data, mode=PUBLIC_FILE_MODE)
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno in {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR}:
                raise FileExistsError(errno.EEXIST, "already exists", str(final)) from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
