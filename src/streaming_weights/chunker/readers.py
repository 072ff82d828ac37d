"""Checkpoint readers for the chunker: safetensors / ``.bin`` directories and GGUF files.

Every reader yields tensors one at a time so the chunker never holds more than a unit in memory:
safetensors tensors are read with ``pread`` straight from the file (no mmap, whose touched pages would
count against the process), ``.bin`` files are opened with ``torch.load(mmap=True, weights_only=True)``
per unit and released afterwards. GGUF files are dequantized whole by transformers (it offers no lazy
path), so they need the whole model's memory once.

Pickle is never unpickled beyond ``weights_only=True``, which refuses anything but tensors.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ..exceptions import ChunkingError, UnsafeFormatError
from ..format.chunkfile import DTYPES, TensorSpec, parse_header
from .naming import default_model_name, source_id  # noqa: F401  (re-exported: they lived here)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "generation_config.json",
    # sentence-transformers' embedding pipeline (pooling, normalization, max_seq_length): the API honors it
    "modules.json",
    "sentence_bert_config.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class Source:
    """A checkpoint: its config, tensor names, and a way to read tensors lazily."""

    path: Path
    config: Any  # transformers PretrainedConfig
    architecture: str | None

    def keys(self) -> list[str]:
        raise NotImplementedError

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def dtypes(self) -> dict[str, torch.dtype]:
        raise NotImplementedError

    def aux_files(self) -> dict[str, bytes]:
        """Tokenizer and generation-config files, ``{file name: bytes}``."""
        out = {}
        for name in TOKENIZER_FILES:
            p = self.path / name
            if p.is_file():
                out[name] = p.read_bytes()
        out.update(sentence_module_configs(self.path))
        return out

    def close(self) -> None:
        pass


def sentence_module_configs(path: Path) -> dict[str, bytes]:
    """The ``config.json`` of each module folder that ``modules.json`` lists (``1_Pooling/config.json``), stored
    flat as ``1_Pooling.config.json`` (manifest file names hold no ``/``); ``{}`` without a ``modules.json``."""
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for m in modules if isinstance(modules, list) else []:
        folder = m.get("path") if isinstance(m, dict) else None
        if isinstance(folder, str) and folder and "/" not in folder and ".." not in folder:
            cfg = path / folder / "config.json"
            if cfg.is_file():
                out[f"{folder}.config.json"] = cfg.read_bytes()
    return out


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ChunkingError(f"cannot read config.json in {path}: {exc}") from exc


#: a safetensors header longer than this is refused before it is read (real ones are a few MiB at most)
MAX_HEADER_BYTES = 100 << 20


class HeaderIndexedSource(Source):
    """A source whose tensors are located from its safetensors files' headers alone (no data is read to index
    them): ``{tensor: (file, data start, spec)}``. Local files and files in a storage (``checkpoint.remote``)
    index the same way; only how bytes are read differs. Errors are :attr:`error` (naming the file)."""

    error: type[Exception] = ChunkingError

    def _index_file(self, file: Any, label: str, size: int, read: Callable[[int, int], bytes]) -> None:
        """Add the tensors of ``file`` (``size`` bytes; ``read(offset, n)`` returns its bytes) to the index."""
        head = read(0, 8)
        if len(head) < 8:
            raise self.error(f"{label} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise self.error(f"{label}: safetensors header of {n} bytes is implausible")
        try:  # validates offsets against the file size without reading the data
            specs, _, start = parse_header(head + read(8, n), size)
        except Exception as exc:  # noqa: BLE001 - a malformed header: name the file
            raise self.error(f"{label}: {exc}") from exc
        for key, spec in specs.items():
            if key in self._where:
                raise self.error(f"tensor {key!r} appears in two checkpoint files ({label} is the second)")
            self._where[key] = (file, start, spec)

    def keys(self) -> list[str]:
        return list(self._where)

    def locate(self, key: str) -> tuple[Any, int, TensorSpec]:
        """(file, absolute offset of tensor ``key``'s first byte in it, its spec there): where a checkpoint served
        as it is reads the tensor's bytes by range."""
        f, start, spec = self._where[key]
        return f, start + spec.data_offsets[0], spec

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: DTYPES[s.dtype] for k, (_, _, s) in self._where.items()}


class SafetensorsSource(HeaderIndexedSource):
    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self.config = _load_config(path)
        self.architecture = (getattr(self.config, "architectures", None) or [None])[0]
        self._where: dict[str, tuple[Path, int, TensorSpec]] = {}
        for f in files:
            with open(f, "rb") as fh:
                def read(offset: int, n: int) -> bytes:
                    fh.seek(offset)
                    return fh.read(n)

                self._index_file(f, str(f), f.stat().st_size, read)

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            f, start, spec = self._where[key]
            buf = anon_buffer(spec.nbytes)
            with open(f, "rb", buffering=0) as fh:
                fh.seek(start + spec.data_offsets[0])
                view, got = memoryview(buf), 0
                while got < len(buf):
                    n = fh.readinto(view[got:])
                    if not n:
                        raise ChunkingError(f"{f} is truncated inside tensor {key!r}")
                    got += n
            if not spec.nbytes:
                yield key, torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
            else:
                yield key, torch.frombuffer(buf, dtype=DTYPES[spec.dtype]).view(spec.shape)


def anon_buffer(nbytes: int) -> mmap.mmap | bytearray:
    """A zeroed, writable buffer whose pages go back to the OS as soon as it is freed.

    Large ``bytearray`` s come from malloc, whose per-thread arenas keep freed memory around; chunking
    allocates one unit-sized buffer per unit from worker threads, so RSS would creep up unit by unit.
    """
    return mmap.mmap(-1, nbytes) if nbytes else bytearray()


_MADV_DONTNEED = 4


def _drop_pages(tensor: torch.Tensor) -> None:
    """Unmap-equivalent for the file pages behind an mmap-loaded tensor once it has been copied.

    They count in RSS while mapped and ``torch.load(mmap=True)`` keeps the whole file mapped; dropping
    them (Linux ``MADV_DONTNEED``; they are re-read from the file if touched again) keeps peak memory at
    one unit plus one tensor. A no-op where ``madvise`` is unavailable.
    """
    global _libc
    nbytes = tensor.untyped_storage().nbytes()
    if nbytes < mmap.PAGESIZE or not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = tensor.untyped_storage().data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours may share the edges
    last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(first, last - first, _MADV_DONTNEED)


_libc: ctypes.CDLL | None = None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # mmap needs torch's zip format; a legacy/raw pickle stream still goes through weights_only (which
    # refuses any global but tensors), just without mmap.
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFormatError(
            f"{path} contains pickled objects other than tensors; refusing to unpickle it "
            "(convert it to safetensors with the tool that made it)"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise ChunkingError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UnsafeFormatError(f"{path} is not a plain state dict of tensors")
    return sd


class BinSource(Source):
    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self.config = _load_config(path)
        self.architecture = (getattr(self.config, "architectures", None) or [None])[0]
        self._where: dict[str, Path] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for f in files:
            sd = _torch_load(f)
            for k, v in sd.items():
                self._where[k] = f
                self._dtypes[k] = v.dtype
            del sd

    def keys(self) -> list[str]:
        return list(self._where)

    def dtypes(self) -> dict[str, torch.dtype]:
        return dict(self._dtypes)

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        keys = list(keys)
        for f in dict.fromkeys(self._where[k] for k in keys):
            sd = _torch_load(f)  # mmap: only the pages of the tensors we touch are read
            for k in keys:
                if self._where[k] == f:
                    tensor = sd[k]
                    yield k, tensor  # the consumer copies it before asking for the next one
                    _drop_pages(tensor)
                    del tensor
            del sd


class GGUFSource(Source):
    def __init__(self, file: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = file.parent
        self.file = file
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(file.parent), gguf_file=file.name, local_files_only=True, dtype=torch.float32
            )
        except Exception as exc:  # noqa: BLE001
            raise ChunkingError(f"transformers cannot load GGUF file {file}: {exc}") from exc
        self.config = model.config
        self.architecture = type(model).__name__
        self._sd = dict(model.state_dict())
        self._generation_config = model.generation_config
        self._tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)

    def keys(self) -> list[str]:
        return list(self._sd)

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self._sd.items()}

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            yield k, self._sd[k]

    def aux_files(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            self._tokenizer.save_pretrained(tmp)
            if self._generation_config is not None:
                self._generation_config.save_pretrained(tmp)
            return {n: (Path(tmp) / n).read_bytes() for n in TOKENIZER_FILES if (Path(tmp) / n).is_file()}

    def close(self) -> None:
        self._sd.clear()


def _index_files(path: Path, index_name: str) -> list[Path] | None:
    idx = path / index_name
    if not idx.is_file():
        return None
    try:
        weight_map = json.loads(idx.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise ChunkingError(f"{idx} is not a valid checkpoint index: {exc}") from exc
    return [path / f for f in dict.fromkeys(weight_map.values())]


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - offline, gated, typo...
        raise ChunkingError(
            f"{repo_id!r} is not a local directory or .gguf file, and the Hugging Face hub could not provide "
            f"it ({type(exc).__name__}: {exc})"
        ) from exc


def open_source(source: str | os.PathLike[str]) -> Source:
    """Open a checkpoint: HF model directory, ``.gguf`` file, or (when reachable) a hub id.

    Raises:
        ChunkingError: nothing loadable there.
        UnsafeFormatError: only pickle files that are not plain tensor state dicts.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFSource(path)
        if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
            return SafetensorsSource(path.parent, [path])
        if path.suffix in _PICKLE_SUFFIXES:
            raise UnsafeFormatError(
                f"{path} is a pickle file; pass its directory (with config.json) so it is read with "
                "torch.load(weights_only=True), or convert it to safetensors"
            )
        raise ChunkingError(f"{path}: expected a model directory, a .gguf file or a .safetensors file")
    if not path.exists():
        if str(source).count("/") <= 1 and not str(source).startswith((".", "/", "~")):
            path = _download(str(source))
        else:
            raise ChunkingError(f"{source}: no such file or directory")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        raise ChunkingError(f"{path} has no config.json (and not exactly one .gguf file)")
    files = _index_files(path, "model.safetensors.index.json") or sorted(path.glob("*.safetensors"))
    if files:
        return SafetensorsSource(path, files)
    files = _index_files(path, "pytorch_model.bin.index.json") or sorted(path.glob("pytorch_model*.bin"))
    if files:
        return BinSource(path, files)
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise UnsafeFormatError(f"{path} only has pickle files {pickles}; convert them to safetensors")
    raise ChunkingError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
