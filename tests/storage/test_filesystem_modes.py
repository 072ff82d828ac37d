"""Files the filesystem backend writes get the umask's mode, as any tool would create them (issue 19 #11):
0644 under umask 022, so another account (a service running ``surfing serve``) can read the chunks."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from streaming_weights.storage.filesystem import FilesystemBackend, current_umask, default_file_mode

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for one test; the old one is put back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_follow_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    assert current_umask() == mask and default_file_mode() == want
    fs = FilesystemBackend(tmp_path)
    asyncio.run(fs.save("m/units/a.safetensors", b"x" * 10))
    asyncio.run(fs.save("m/manifest.json", b"{}"))
    asyncio.run(fs.save("m/manifest.json", b"{ }"))  # replacing keeps the same rule
    assert mode(tmp_path / "m/units/a.safetensors") == want
    assert mode(tmp_path / "m/manifest.json") == want
    assert (tmp_path / "m/manifest.json").read_bytes() == b"{ }"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["manifest.json", "units"]  # no temp files
