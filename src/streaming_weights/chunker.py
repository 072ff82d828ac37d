"""Chunk a Hugging Face checkpoint into one safetensors file per unit plus ``manifest.json``.

Units are written first and the manifest last (atomically, after removing any previous one), so an
interrupted run never leaves a manifest pointing at missing or partial units; rerunning completes it
and produces byte-identical files. Peak memory is about one unit plus its largest tensor
(GGUF input excepted: transformers dequantizes it whole).

Run as ``surfing chunk SOURCE --output-dir DIR`` or ``python -m streaming_weights.chunker``.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter
from typing import Any, Callable

import torch

from .exceptions import ChunkingError, ConfigurationError
from .format.chunkfile import dtype_name, plan_unit, tensor_view
from .format.hashing import Digests
from .format.manifest import BlobEntry, Manifest, UnitEntry
from .format.names import MANIFEST_FILE, RESIDENT_UNIT, file_path, join_key, unit_path
from .models.architecture import build_meta_model, resolve_architecture, unit_map
from .sources import Source, anon_buffer, open_source
from .storage import FilesystemBackend, StorageBackend

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LEGACY = ((".gamma", ".weight"), (".beta", ".bias"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ConfigurationError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def map_checkpoint_keys(ckpt_keys: list[str], model_keys: list[str], tied: dict[str, str],
                        buffers: set[str], prefix: str) -> dict[str, str]:
    """``{model key: checkpoint key}`` for every tensor the model stores.

    Handles a base-model prefix present on one side only (``bert.`` / ``model.``), legacy
    ``gamma``/``beta`` names, tied aliases and non-persistent buffers saved by older versions.

    Raises:
        ChunkingError: a model tensor is missing, or the checkpoint has tensors the model lacks.
    """
    wanted = set(model_keys)
    out: dict[str, str] = {}
    unexpected = []
    for ck in ckpt_keys:
        cands = [ck, f"{prefix}.{ck}" if prefix else ck]
        if prefix and ck.startswith(prefix + "."):
            cands.append(ck[len(prefix) + 1 :])
        for old, new in _LEGACY:
            cands += [c[: -len(old)] + new for c in list(cands) if c.endswith(old)]
        hit = next((c for c in cands if c in wanted), None)
        if hit is not None:
            if hit in out:
                raise ChunkingError(f"checkpoint tensors {out[hit]!r} and {ck!r} both map to {hit!r}")
            out[hit] = ck
        elif not any(c in tied or c in buffers for c in cands) and not ck.endswith(".attn.masked_bias"):
            unexpected.append(ck)
    missing = sorted(wanted - set(out))
    if missing or unexpected:
        raise ChunkingError(
            f"checkpoint does not match the model class: missing {missing[:8]}{'…' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
        )
    return out


class ModelChunker:
    """Split a model into per-unit safetensors files and a manifest.

    Args:
        model_name: local HF directory, ``.gguf`` file, or hub id (when the hub is reachable).
        output_dir: the model directory to write (``DIR/manifest.json``, ``DIR/units/…``).
        storage_backend: write there instead (under ``prefix``), e.g. an :class:`S3Backend`.
        dtype: cast floating tensors to ``float32``/``float16``/``bfloat16``; ``None`` keeps the source's.
        compress: the original project's flag: ``True`` means ``dtype="float16"``.
        name: the model name recorded in the manifest (default: ``model_name`` as given).
        progress: show a progress bar (units and bytes) on stderr.
        s3_bucket, s3_prefix, s3_region, s3_endpoint, aws_*: chunk straight to S3 (original keywords).
    """

    def __init__(
        self,
        model_name: str,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        storage_backend: StorageBackend | None = None,
        prefix: str = "",
        dtype: str | torch.dtype | None = None,
        compress: bool = False,
        name: str | None = None,
        progress: bool = False,
        s3_bucket: str | None = None,
        s3_prefix: str = "",
        s3_region: str | None = None,
        s3_endpoint: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        aws_profile: str | None = None,
        on_unit: Callable[[str], None] | None = None,
    ) -> None:
        if compress and dtype is not None and parse_dtype(dtype) != torch.float16:
            raise ConfigurationError("compress=True means float16; do not also pass another dtype")
        self.model_name = str(model_name)
        self.name = name or self.model_name
        self.dtype = torch.float16 if compress else parse_dtype(dtype)
        self.progress = progress
        self._on_unit = on_unit
        given = sum(x is not None for x in (output_dir, storage_backend, s3_bucket))
        if given > 1:
            raise ConfigurationError("pass only one of output_dir, storage_backend, s3_bucket")
        if s3_bucket is not None:
            from .storage.s3 import S3Backend

            storage_backend = S3Backend(
                s3_bucket, prefix=s3_prefix, region_name=s3_region, endpoint_url=s3_endpoint,
                aws_access_key_id=aws_access_key_id, aws_secret_access_key=aws_secret_access_key,
                aws_session_token=aws_session_token, profile_name=aws_profile,
            )
        self.storage = storage_backend or FilesystemBackend(output_dir if output_dir is not None else "./chunks")
        self.prefix = prefix.strip("/")

    def _key(self, rel: str) -> str:
        return join_key(self.prefix, rel)

    async def chunk_model(self) -> dict[str, Any]:
        """Write every unit, then the manifest. Returns a summary dict.

        Returns:
            ``{"name", "manifest", "chunks": [unit names], "num_units", "total_size_mb", "dtype", "storage"}``
        """
        source = await asyncio.to_thread(open_source, self.model_name)
        try:
            return await self._chunk(source)
        finally:
            source.close()

    async def _chunk(self, source: Source) -> dict[str, Any]:
        arch = source.architecture
        if not arch:
            raise ChunkingError(f"{self.model_name}: config.json names no 'architectures'; cannot pick a model class")
        cls = resolve_architecture(arch)
        config = source.config
        src_dtypes = source.dtypes()
        floats = Counter(d for d in src_dtypes.values() if d.is_floating_point)
        model_dtype = self.dtype or (floats.most_common(1)[0][0] if floats else torch.float32)
        config.dtype = model_dtype
        meta = build_meta_model(cls, config, model_dtype)
        umap = unit_map(meta)
        buffers = {n for n, _ in meta.named_buffers()}
        # Checkpoints of a head model loaded into a base model (or the reverse) differ by this prefix.
        base_prefix = getattr(meta, "base_model_prefix", "") or ""
        mapping = map_checkpoint_keys(source.keys(), umap.state_keys, umap.tied, buffers, base_prefix)
        meta_state = meta.state_dict(keep_vars=True)
        del meta

        by_unit: dict[str, list[str]] = {u: [] for u in umap.units()}
        for key in umap.state_keys:
            by_unit[umap.unit_of(key)].append(key)
        by_unit = {u: ks for u, ks in by_unit.items() if ks}

        def out_dtype(key: str) -> torch.dtype:
            src = src_dtypes[mapping[key]]
            return self.dtype if (self.dtype is not None and src.is_floating_point) else src

        def shape_of(key: str) -> tuple[int, ...]:
            return tuple(meta_state[key].shape)

        # Never leave a stale manifest pointing at units this run is about to replace.
        if await self.storage.exists(self._key(MANIFEST_FILE)):
            await self.storage.delete(self._key(MANIFEST_FILE))

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = sum(math.prod(shape_of(k)) * out_dtype(k).itemsize for ks in by_unit.values() for k in ks)
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"chunking {self.name}")
        entries: list[UnitEntry] = []
        try:
            for order, (unit, keys) in enumerate(by_unit.items()):
                entry = await self._write_unit(unit, order, keys, source, mapping, out_dtype, shape_of)
                entries.append(entry)
                if bar is not None:
                    bar.update(entry.data_bytes)
                    bar.set_postfix_str(f"unit {order + 1}/{len(by_unit)}")
                if self._on_unit is not None:
                    self._on_unit(unit)
        finally:
            if bar is not None:
                bar.close()

        files = []
        for fname, data in sorted(source.aux_files().items()):
            d = Digests.of(data)
            await self.storage.save(self._key(file_path(fname)), data)
            files.append(BlobEntry(fname, file_path(fname), len(data), d.sha256, d.blake3))

        config_dict = config.to_dict()
        manifest = Manifest(
            name=self.name,
            architecture=cls.__name__,
            model_type=config.model_type,
            config=config_dict,
            dtype=str(model_dtype).removeprefix("torch."),
            units=tuple(entries),
            files=tuple(files),
            tied=dict(umap.tied),
            source=os.path.basename(str(self.model_name).rstrip("/")),
        )
        await self.storage.save(self._key(MANIFEST_FILE), manifest.to_bytes())
        total = manifest.total_bytes
        return {
            "name": self.name,
            "manifest": self._key(MANIFEST_FILE),
            "storage": self.storage.location,
            "chunks": [u.name for u in entries],
            "num_units": len(entries),
            "num_streamed": len(manifest.streamed),
            "total_size_mb": total / (1 << 20),
            "largest_unit_mb": max(u.bytes for u in entries) / (1 << 20),
            "dtype": manifest.dtype,
            "architecture": manifest.architecture,
        }

    async def _write_unit(self, unit, order, keys, source, mapping, out_dtype, shape_of) -> UnitEntry:
        layout = plan_unit({k: (dtype_name(out_dtype(k)), shape_of(k)) for k in keys})
        back = {mapping[k]: k for k in keys}

        def fill() -> tuple[Any, Digests]:
            buf = anon_buffer(layout.total_bytes)  # freed pages return to the OS (see anon_buffer)
            buf[: layout.data_start] = layout.header
            for ck, tensor in source.read_tensors([mapping[k] for k in keys]):
                key = back[ck]
                spec = layout.tensors[key]
                if tuple(tensor.shape) != spec.shape:
                    raise ChunkingError(
                        f"checkpoint tensor {ck!r} has shape {tuple(tensor.shape)}, the model expects {spec.shape}"
                    )
                if tensor.numel():
                    tensor_view(buf, layout, key, spec).copy_(tensor)
                del tensor  # one source tensor at a time
            return buf, Digests.of(buf)

        buf, digests = await asyncio.to_thread(fill)
        path = unit_path(unit)
        await self.storage.save(self._key(path), buf)
        role = "resident" if unit == RESIDENT_UNIT else "streamed"
        return UnitEntry(unit, path, len(buf), digests.sha256, digests.blake3, role=role, order=order,
                         tensors=dict(layout.tensors))


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["chunk", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
