"""EVM key files (the oracle's and the admin's account): created 0600 from their first
byte, and refused when their group or others may read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meterproof.bridge.evm.client import load_key, new_key
from meterproof.errors import InputError


def test_a_new_key_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every mode the file has had, not only the final one: a file created with the
    umask's 0644 and chmod-ed afterwards was readable in between."""
    seen: list[int] = []
    real_chmod = Path.chmod
    path = tmp_path / "evm" / "oracle.key"

    def chmod(self: Path, mode: int, *, follow_symlinks: bool = True) -> None:
        seen.append(stat.S_IMODE(self.stat().st_mode))  # the mode it had until now
        real_chmod(self, mode, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "chmod", chmod)
    old_umask = os.umask(0o022)
    try:
        account = new_key(path)
    finally:
        os.umask(old_umask)
    seen.append(stat.S_IMODE(path.stat().st_mode))
    assert all(mode == 0o600 for mode in seen), [oct(m) for m in seen]
    assert load_key(path).address == account.address
    with pytest.raises(FileExistsError):
        new_key(path)  # never overwritten
    link = tmp_path / "evm" / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(FileExistsError):
        new_key(link)  # nor created through a link
    assert not (tmp_path / "elsewhere.key").exists()


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "oracle.key"
    account = new_key(path)
    for loose in (0o644, 0o640, 0o604, 0o660):
        path.chmod(loose)
        with pytest.raises(InputError, match=f"has mode 0{loose:o}: its group or others"):
            load_key(path)
    path.chmod(0o400)
    assert load_key(path).address == account.address
    with pytest.raises(InputError, match="No such file"):
        load_key(tmp_path / "missing.key")
