"""A chunker :class:`~streaming_weights.chunker.readers.Source` over a checkpoint in a storage (``s3://``): the
safetensors headers and each tensor read by range, the config parsed from ``config.json``'s bytes. Nothing is
downloaded whole but the small files (config, tokenizer)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..chunker.readers import TOKENIZER_FILES, HeaderIndexedSource, anon_buffer
from ..exceptions import CheckpointError
from ..format.chunkfile import DTYPES, TensorSpec

_INDEX = "model.safetensors.index.json"


def _config(files: Any) -> Any:
    from transformers import AutoConfig

    data = files.read("config.json")
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads configs from a folder
        (Path(tmp) / "config.json").write_bytes(data or b"")
        try:
            return AutoConfig.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise CheckpointError(f"cannot read config.json in {files.location}: {exc}") from exc


class StoredSafetensorsSource(HeaderIndexedSource):
    """The checkpoint ``files`` (a :class:`~.files.StoredFiles`) as a chunker source."""

    error = CheckpointError

    def __init__(self, files: Any) -> None:
        self.files = files
        self.path = Path(files.location)
        self.config = _config(files)
        self.architecture = (getattr(self.config, "architectures", None) or [None])[0]
        self._where: dict[str, tuple[str, int, TensorSpec]] = {}
        for name in self._weight_files():
            self._index_file(name, f"{files.location}/{name}", files.stats([name])[name][0],
                             lambda offset, n, name=name: files.pread(name, offset, n))

    def _weight_files(self) -> list[str]:
        index = self.files.read(_INDEX)
        if index is not None:
            try:
                return list(dict.fromkeys(json.loads(index)["weight_map"].values()))
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{self.files.location}/{_INDEX} is not a valid checkpoint index: {exc}") from exc
        return [n for n in self.files.names() if n.endswith(".safetensors")]

    def read_tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            name, offset, spec = self.locate(key)
            if not spec.nbytes:
                yield key, torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
                continue
            data = self.files.pread(name, offset, spec.nbytes)
            if len(data) != spec.nbytes:
                raise CheckpointError(f"{self.files.location}/{name} is truncated inside tensor {key!r}")
            buf = anon_buffer(spec.nbytes)
            buf[:] = data
            yield key, torch.frombuffer(buf, dtype=DTYPES[spec.dtype]).view(spec.shape)

    def aux_files(self) -> dict[str, bytes]:
        present = set(self.files.names())
        return {n: data for n in TOKENIZER_FILES if n in present and (data := self.files.read(n)) is not None}


__all__ = ["StoredSafetensorsSource"]
