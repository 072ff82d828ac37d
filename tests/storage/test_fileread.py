"""storage.fileread: O_DIRECT where allowed, page cache otherwise (then dropped), pieces in order, short files."""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import blake3
import pytest

from streaming_weights.exceptions import KeyNotFoundError
from streaming_weights.storage import FilesystemBackend, fileread


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(fileread, "PIECE", 64 << 10)  # many pieces in flight on a small file


def unit_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer like the client's unit buffers."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped: the chunker fsyncs its files too
    return data


def cached(path: Path) -> int:
    if shutil.which("fincore") is None:
        pytest.skip("needs util-linux fincore to see the page cache")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.mark.parametrize("size", [1, 4096, 1 << 20, (1 << 20) + 123])
def test_aligned_buffer_reads_the_file_in_order_and_leaves_no_page_cache(tmp_path, size):
    path = tmp_path / "u.bin"
    data = write(path, size)
    evict(path)
    buf = unit_buffer(size)  # page-aligned: the O_DIRECT path where the filesystem allows it
    seen = []
    assert fileread.read_file_into(path, memoryview(buf), on_piece=lambda v: seen.append(bytes(v))) == size
    assert bytes(buf) == data
    assert b"".join(seen) == data  # every byte handed over once, in file order
    assert cached(path) == 0


def test_unaligned_buffer_and_offset_go_through_the_page_cache_and_drop_it(tmp_path):
    path = tmp_path / "u.bin"
    data = write(path, (1 << 20) + 5)
    evict(path)
    buf = bytearray(len(data) - 7)
    view = memoryview(buf)[1:]  # an odd address: no O_DIRECT
    h = blake3.blake3()
    assert fileread.read_file_into(path, view, 8, on_piece=h.update) == len(data) - 8
    assert bytes(view) == data[8:]
    assert h.hexdigest() == blake3.blake3(data[8:]).hexdigest()
    assert cached(path) == 0


def test_short_file_returns_what_it_has(tmp_path):
    path = tmp_path / "u.bin"
    data = write(path, 300_000)
    buf = unit_buffer(1 << 20)
    assert fileread.read_file_into(path, memoryview(buf)) == len(data)
    assert bytes(buf[: len(data)]) == data
    assert fileread.read_file_into(path, memoryview(buf), offset=len(data) + 10) == 0


def test_tmpfs_reads_whether_or_not_it_takes_o_direct(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("needs a writable tmpfs at /dev/shm")
    d = shm / f"surfing-test-{os.getpid()}"
    d.mkdir()
    try:
        path = d / "u.bin"
        data = write(path, (1 << 20) + 4096)
        buf = unit_buffer(len(data))
        assert fileread.read_file_into(path, memoryview(buf)) == len(data)
        assert bytes(buf) == data
    finally:
        shutil.rmtree(d)


def test_o_direct_refused_at_open_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    path = tmp_path / "u.bin"
    data = write(path, (1 << 20) + 10)
    evict(path)
    real_open = os.open

    def einval_for_direct(p, flags, *a):
        if flags & os.O_DIRECT:  # what tmpfs before Linux 6.6 and some FUSE filesystems answer
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(fileread.os, "open", einval_for_direct)
    buf = unit_buffer(len(data))
    assert fileread.read_file_into(path, memoryview(buf)) == len(data)
    assert bytes(buf) == data
    assert cached(path) == 0


def test_o_direct_opened_but_refused_at_read_time_falls_back_without_handing_bytes_twice(tmp_path, monkeypatch):
    path = tmp_path / "u.bin"
    data = write(path, 1 << 20)
    real = fileread._read_full
    direct_fds = set()
    real_open = os.open

    def tracking_open(p, flags, *a):
        fd = real_open(p, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing(fd, view, offset, cached_fd=None):
        if fd in direct_fds:
            raise OSError(22, "Invalid argument")
        return real(fd, view, offset, cached_fd)

    monkeypatch.setattr(fileread.os, "open", tracking_open)
    monkeypatch.setattr(fileread, "_read_full", refusing)
    buf, seen = unit_buffer(len(data)), []
    assert fileread.read_file_into(path, memoryview(buf), on_piece=lambda v: seen.append(bytes(v))) == len(data)
    assert bytes(buf) == data and b"".join(seen) == data and direct_fds


def test_filesystem_backend_read_into_uses_it_and_maps_errors(tmp_path):
    data = write(tmp_path / "a.bin", 200_000)
    fs = FilesystemBackend(tmp_path)
    buf = unit_buffer(len(data))
    h = blake3.blake3()
    assert asyncio.run(fs.read_into("a.bin", buf, on_piece=h.update)) == len(data)
    assert bytes(buf) == data and h.hexdigest() == blake3.blake3(data).hexdigest()
    with pytest.raises(KeyNotFoundError):
        asyncio.run(fs.read_into("missing.bin", buf))


def test_a_file_the_page_cache_holds_is_copied_from_there_and_stays(tmp_path):
    path = tmp_path / "u.bin"
    data = write(path, 3 << 20)
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not fileread.resident(fd, 0, len(data))
        os.pread(fd, len(data), 0)  # someone reads it through the cache
        assert fileread.resident(fd, 0, len(data)) and fileread.resident(fd, 12345, 100)
    finally:
        os.close(fd)
    buf = unit_buffer(len(data))
    assert fileread.read_file_into(path, memoryview(buf)) == len(data)
    assert bytes(buf) == data
    assert cached(path) == len(data)  # not dropped: it was there before, and other readers rely on it
    view = memoryview(bytearray(len(data) + 1))[1:]  # unaligned: the page-cache path
    assert fileread.read_file_into(path, view) == len(data) and bytes(view) == data
    assert cached(path) == len(data)


def test_a_file_replaced_between_the_two_opens_is_read_whole_from_the_first(tmp_path, monkeypatch):
    # a re-chunk renames a new unit file over the old one while it is being read: every byte comes from the file
    # the read was sized with (the O_DIRECT descriptor would see the new one), never a mix of the two
    path, new = tmp_path / "u.bin", tmp_path / "new.bin"
    old_data = write(path, 1 << 20)
    write(new, 1 << 20)
    evict(path)
    real_open = os.open

    def replacing_open(p, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0) and new.exists():
            os.replace(new, path)
        return real_open(p, flags, *a)

    monkeypatch.setattr(fileread.os, "open", replacing_open)
    buf = unit_buffer(1 << 20)
    assert fileread.read_file_into(path, memoryview(buf)) == 1 << 20
    assert not new.exists()  # the replacement happened, at the O_DIRECT open
    assert bytes(buf) == old_data
