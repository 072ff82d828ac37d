"""storage/: the StorageBackend contract, run against every shipped local backend."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from streaming_weights.exceptions import InvalidKeyError, KeyNotFoundError, SecurityError, StorageError
from streaming_weights.storage import FilesystemBackend, MemoryBackend, StorageBackend, open_storage


@pytest.fixture(params=["fs", "memory"])
def backend(request, tmp_path) -> StorageBackend:
    return FilesystemBackend(tmp_path / "root") if request.param == "fs" else MemoryBackend()


async def test_contract(backend):
    data = bytes(range(256)) * 40
    assert await backend.list() == []
    assert not await backend.exists("m/units/a.safetensors")
    await backend.save("m/units/a.safetensors", data)
    await backend.save("m/manifest.json", bytearray(b"{}"))
    await backend.save("other/x", memoryview(b"xyz"))
    assert await backend.exists("m/units/a.safetensors")
    assert await backend.load("m/units/a.safetensors") == data
    assert await backend.load("other/x") == b"xyz"
    assert await backend.size("m/units/a.safetensors") == len(data)
    assert await backend.list() == ["m/manifest.json", "m/units/a.safetensors", "other/x"]
    assert await backend.list("m/") == ["m/manifest.json", "m/units/a.safetensors"]
    assert await backend.list("m/units") == ["m/units/a.safetensors"]
    assert await backend.list("zzz") == []
    # ranges, including past the end
    assert await backend.read_range("m/units/a.safetensors", 10, 100) == data[10:110]
    assert await backend.read_range("m/units/a.safetensors", len(data) - 5, 100) == data[-5:]
    assert await backend.read_range("m/units/a.safetensors", len(data) + 5, 10) == b""
    buf = bytearray(1000)
    assert await backend.read_into("m/units/a.safetensors", buf) == 1000
    assert buf == data[:1000]
    buf = bytearray(len(data))
    assert await backend.read_into("m/units/a.safetensors", memoryview(buf)[100:], offset=0) == len(data) - 100
    assert buf[100:] == data[: len(data) - 100]
    big = bytearray(len(data) + 50)
    assert await backend.read_into("m/units/a.safetensors", big, offset=6) == len(data) - 6
    assert big[: len(data) - 6] == data[6:]
    # overwrite replaces
    await backend.save("other/x", b"new")
    assert await backend.load("other/x") == b"new"
    # keys are normalized: './' and '//' are the same object
    assert await backend.load("m//units/./a.safetensors") == data
    await backend.delete("other/x")
    assert not await backend.exists("other/x")
    await backend.delete("other/x")  # deleting a missing key is a no-op
    assert await backend.list() == ["m/manifest.json", "m/units/a.safetensors"]
    await backend.close()
    await backend.close()


async def test_empty_object(backend):
    await backend.save("e", b"")
    assert await backend.load("e") == b""
    assert await backend.size("e") == 0
    assert await backend.read_into("e", bytearray(4)) == 0


@pytest.mark.parametrize("op", ["load", "size", "read_range", "read_into"])
async def test_missing_key(backend, op):
    call = {"load": lambda: backend.load("nope/x"), "size": lambda: backend.size("nope/x"),
            "read_range": lambda: backend.read_range("nope/x", 0, 4),
            "read_into": lambda: backend.read_into("nope/x", bytearray(4))}[op]
    with pytest.raises(KeyNotFoundError, match="nope/x") as info:
        await call()
    assert isinstance(info.value, StorageError) and isinstance(info.value, KeyError)


BAD_KEYS = ["../x", "/abs", "/etc/passwd", "a/../../b", "..", "a/..", "a\\..\\b", "a\\b", "a\x00b", "", ".", "a/./.."]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("op", ["load", "save", "exists", "read_range", "size", "delete"])
async def test_escaping_keys_rejected(backend, key, op, tmp_path):
    call = {"load": lambda: backend.load(key), "save": lambda: backend.save(key, b"x"),
            "exists": lambda: backend.exists(key), "read_range": lambda: backend.read_range(key, 0, 1),
            "size": lambda: backend.size(key), "delete": lambda: backend.delete(key)}[op]
    with pytest.raises(InvalidKeyError) as info:
        await call()
    assert isinstance(info.value, SecurityError)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


async def test_symlink_escaping_root_rejected(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "filelink").symlink_to(outside / "secret")
    fs = FilesystemBackend(root)
    for key in ("link/secret", "filelink"):
        with pytest.raises(InvalidKeyError, match="outside"):
            await fs.load(key)
        with pytest.raises(InvalidKeyError):
            await fs.read_into(key, bytearray(6))
    with pytest.raises(InvalidKeyError):
        await fs.save("link/new", b"x")
    assert not (outside / "new").exists()
    # a symlink that stays inside the root is fine
    (root / "real").mkdir()
    (root / "real" / "f").write_bytes(b"ok")
    (root / "inner").symlink_to(root / "real", target_is_directory=True)
    assert await fs.load("inner/f") == b"ok"


async def test_directory_is_not_an_object(tmp_path):
    fs = FilesystemBackend(tmp_path)
    (tmp_path / "d").mkdir()
    assert not await fs.exists("d")
    with pytest.raises(KeyNotFoundError):
        await fs.load("d")


async def test_filesystem_save_is_atomic(tmp_path, monkeypatch):
    """A reader never sees a partial object: the old bytes until the rename, then the new ones."""
    fs = FilesystemBackend(tmp_path)
    await fs.save("k", b"old" * 1000)
    real_fsync = os.fsync
    seen: list[bytes] = []
    listed: list[list[str]] = []

    def spy_fsync(fd):  # called after the temp file is written, before the rename
        seen.append((tmp_path / "k").read_bytes())
        listed.append(sorted(p.name for p in tmp_path.iterdir()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    await fs.save("k", b"new" * 2000)
    assert seen == [b"old" * 1000]
    assert any(n.startswith(".k.") and n.endswith(".tmp") for n in listed[0])  # written beside it...
    assert await fs.list() == ["k"]  # ...but never listed
    assert (tmp_path / "k").read_bytes() == b"new" * 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # and renamed away


async def test_filesystem_failed_save_leaves_old_object(tmp_path, monkeypatch):
    fs = FilesystemBackend(tmp_path)
    await fs.save("k", b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StorageError, match="disk full"):
        await fs.save("k", b"new")
    assert (tmp_path / "k").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # temp file cleaned up


async def test_temp_files_not_listed(tmp_path):
    fs = FilesystemBackend(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ".a.safetensors.abc123.tmp").write_bytes(b"partial")
    await fs.save("m/a.safetensors", b"x")
    assert await fs.list() == ["m/a.safetensors"]


async def test_concurrent_saves_never_tear(tmp_path):
    fs = FilesystemBackend(tmp_path)
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    stop = threading.Event()
    torn: list[int] = []
    await fs.save("k", payloads[0])

    def reader():
        while not stop.is_set():
            data = (tmp_path / "k").read_bytes()
            if data not in payloads:
                torn.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        await asyncio.gather(*(fs.save("k", p) for p in payloads))
    finally:
        stop.set()
        t.join()
    assert torn == []


def test_memory_backend_stores_immutable_copies():
    data = bytearray(b"abc")
    mem = MemoryBackend({"a/b": data})
    data[0] = 0
    assert asyncio.run(mem.load("a/b")) == b"abc"
    with pytest.raises(InvalidKeyError):
        MemoryBackend({"../x": b""})


def test_open_storage(tmp_path):
    mem = MemoryBackend()
    assert open_storage(mem) == (mem, "")
    fs, prefix = open_storage(str(tmp_path))
    assert isinstance(fs, FilesystemBackend) and fs.base_dir == tmp_path.resolve() and prefix == ""


class _Recording(MemoryBackend):
    """A backend that reads like the default ``read_into`` and records what its ``on_piece`` was handed."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.pieces: list[int] = []

    async def read_into(self, key, buf, *, offset=0, on_piece=None):
        seen = on_piece and (lambda piece: (self.pieces.append(len(piece)), on_piece(piece)))
        return await super().read_into(key, buf, offset=offset, on_piece=seen)


@pytest.mark.parametrize("where", ["directory", "memory"])
def test_every_backend_hashes_what_it_read_and_a_tampered_unit_fails(tiny_chunks, where):
    """StorageSource verifies through one path for every backend: the bytes go to the hash as ``read_into``
    hands them over (a local directory while it reads, the default once read), so a byte changed in storage is
    an IntegrityError naming the unit, and an intact unit decodes to the stored tensors."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from streaming_weights.client import StorageSource
    from streaming_weights.exceptions import IntegrityError

    _, chunks = tiny_chunks("llama", layers=2)
    files = {p.relative_to(chunks).as_posix(): p.read_bytes() for p in chunks.rglob("*") if p.is_file()}
    victim = next(k for k in files if k.startswith("units/") and "layers.1" in k)
    good = next(k for k in files if k.startswith("units/") and "layers.0" in k)

    async def run(storage):
        source = StorageSource(storage)
        try:
            manifest = await source.get_manifest(None)
            unit = next(u for u in manifest.units if u.path == good)
            fetched = await source.fetch_unit(manifest, unit.name)
            expected = load_file(str(chunks / good))
            assert all(torch.equal(fetched.tensors[k], v) for k, v in expected.items())
            bad = next(u for u in manifest.units if u.path == victim)
            with pytest.raises(IntegrityError, match=bad.path.split("/")[-1].replace(".", r"\.")):
                await source.fetch_unit(manifest, bad.name)
        finally:
            await source.close()

    tampered = bytearray(files[victim])
    tampered[-1] ^= 0x01  # the last byte of the last tensor's data
    if where == "memory":
        storage = _Recording(files | {victim: bytes(tampered)})
        asyncio.run(run(storage))
        assert storage.pieces == [len(files[good]), len(files[victim])]  # all at once, after the read
    else:
        copy = Path(str(chunks) + "-tampered")
        if not copy.exists():
            shutil.copytree(chunks, copy)
            (copy / victim).write_bytes(bytes(tampered))
        asyncio.run(run(FilesystemBackend(copy)))


def test_a_unit_changed_in_a_directory_after_it_was_fingerprinted_is_refused(tiny_chunks, tmp_path):
    """Reading a local directory goes through the same fingerprints as the network (client.fingerprint): the
    third read of a unit is checked against the bytes verified before, so a byte changed since is refused."""
    import shutil

    from streaming_weights.client import StorageSource
    from streaming_weights.exceptions import IntegrityError

    _, chunks = tiny_chunks("llama", layers=2)
    copy = tmp_path / "chunks"
    shutil.copytree(chunks, copy)

    async def run():
        source = StorageSource(FilesystemBackend(copy))
        try:
            manifest = await source.get_manifest(None)
            unit = manifest.streamed[1]
            for _ in range(3):
                (await source.fetch_unit(manifest, unit.name)).recycle(None)
            assert source.fingerprints.tag_bytes == unit.bytes
            path = copy / unit.path
            data = bytearray(path.read_bytes())
            data[len(data) // 3] ^= 0x10
            path.write_bytes(bytes(data))
            with pytest.raises(IntegrityError, match="differs from the bytes verified against its manifest hash"):
                await source.fetch_unit(manifest, unit.name)
        finally:
            await source.close()

    asyncio.run(run())
