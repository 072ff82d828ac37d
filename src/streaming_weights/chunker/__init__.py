"""Chunk a Hugging Face checkpoint into one safetensors file per unit plus ``manifest.json``.

Public surface: :class:`ModelChunker`, :class:`ChunkProgress`, :func:`default_model_name`,
:func:`parse_dtype`, :func:`map_checkpoint_keys`. Submodules: ``readers`` (checkpoint readers),
``plan`` (what goes where, before any tensor is read). Writing goes through
:class:`~streaming_weights.format.builder.ModelBuilder`: units first, the manifest last and atomically,
so an interrupted run never leaves a manifest pointing at missing or partial units; rerunning completes
it and produces byte-identical files. Peak memory is about one unit plus its largest tensor (GGUF input
excepted: transformers dequantizes it whole); a tensor split into row shards is read once, and each shard
unit is filled from it in turn.

Run as ``surfing chunk SOURCE --output-dir DIR`` (or ``python -m streaming_weights.chunker``, the same
command). This package never imports the CLI.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..exceptions import ConfigurationError
from ..format.builder import ModelBuilder
from ..format.manifest import Manifest, UnitEntry
from ..format.names import MANIFEST_FILE, join_key
from ..format.quant import SCHEMES
from ..storage.base import StorageBackend
from ..memory import pin_mmap_threshold
from ..storage import S3Options
from ..storage.filesystem import FilesystemBackend
from .plan import ModelPlan, map_checkpoint_keys, parse_dtype, parse_shard_size, plan_model
from .naming import default_model_name, source_id
from .produce import produce_group
from .readers import Source, open_source


@dataclass(frozen=True)
class ChunkProgress:
    """Reported after each unit is written (``on_progress``)."""

    unit: str
    units_done: int
    units_total: int
    bytes_done: int
    bytes_total: int


class ModelChunker:
    """Split a model into per-unit safetensors files and a manifest.

    Args:
        model_name: local HF directory, ``.gguf`` file, or hub id (when the hub is reachable).
        output_dir: the model directory to write (``DIR/manifest.json``, ``DIR/units/…``).
        storage_backend: write there instead (under ``prefix``), e.g. an :class:`S3Backend`.
        dtype: cast floating tensors to ``float32``/``float16``/``bfloat16``; ``None`` keeps the source's.
        compress: the original project's flag: ``True`` means ``dtype="float16"``.
        quantize: ``None`` (default), ``"int8"`` or ``"int4"``: store linear and embedding weights
            quantized (:mod:`streaming_weights.format.quant`; lossy, see docs/format.md for the errors).
        name: the model name recorded in the manifest (default: :func:`default_model_name` of the source).
        force: replace a *different* model stored at the target (its files are deleted first); without
            it, :meth:`chunk_model` raises ChunkingError there. Re-chunking the same name always works.
        shard_size: split the input embedding's and the (untied) LM head's weights into row-shard units:
            ``"auto"`` (default) only a weight larger than both the largest streamed unit and 16 MiB, into
            shards of about the largest streamed unit; a size (``"64MB"``, ``"1GiB"``, bytes) every such
            weight, into shards of at most that many stored bytes; ``None`` / ``"off"``: never.
        expert_units: mixture-of-experts models: store each expert as a unit of its own (default; a token
            fetches only the experts its router picks); ``False``: experts stay in their layer's unit.
        progress: show a progress bar (units and bytes) on stderr.
        on_unit: called with each unit's name once it is written.
        on_progress: called with a :class:`ChunkProgress` once each unit is written.
        s3_bucket, s3_prefix: chunk straight to S3, reached with ``s3`` (:class:`~..storage.S3Options`: endpoint,
            region, credentials); the original flat keywords ``s3_region``, ``s3_endpoint``, ``aws_access_key_id``,
            ``aws_secret_access_key``, ``aws_session_token``, ``aws_profile`` still work.
    """

    def __init__(
        self,
        model_name: str | os.PathLike[str],
        output_dir: str | os.PathLike[str] | None = None,
        *,
        storage_backend: StorageBackend | None = None,
        prefix: str = "",
        dtype: str | torch.dtype | None = None,
        compress: bool = False,
        quantize: str | None = None,
        name: str | None = None,
        force: bool = False,
        shard_size: int | str | None = "auto",
        expert_units: bool = True,
        progress: bool = False,
        s3: S3Options | None = None,
        s3_bucket: str | None = None,
        s3_prefix: str = "",
        on_unit: Callable[[str], None] | None = None,
        on_progress: Callable[[ChunkProgress], None] | None = None,
        **s3_legacy: Any,
    ) -> None:
        if compress and dtype is not None and parse_dtype(dtype) != torch.float16:
            raise ConfigurationError("compress=True means float16; do not also pass another dtype")
        self.model_name = str(model_name)
        self.name = name or default_model_name(self.model_name)
        self.dtype = torch.float16 if compress else parse_dtype(dtype)
        if quantize is not None and quantize not in SCHEMES:
            raise ConfigurationError(f"quantize must be one of {list(SCHEMES)} or None, got {quantize!r}")
        self.quantize = quantize
        self.shard_size = parse_shard_size(shard_size)
        self.expert_units = bool(expert_units)
        self.force = force
        self.progress = progress
        self._on_unit = on_unit
        self._on_progress = on_progress
        if sum(x is not None for x in (output_dir, storage_backend, s3_bucket)) > 1:
            raise ConfigurationError("pass only one of output_dir, storage_backend, s3_bucket")
        if s3_bucket is not None:
            storage_backend = _s3_options(s3, s3_legacy).backend(s3_bucket, s3_prefix)
        elif s3_legacy:
            raise TypeError(f"ModelChunker got unexpected keyword arguments {sorted(s3_legacy)}")
        self.storage = storage_backend or FilesystemBackend(output_dir if output_dir is not None else "./chunks")
        self.prefix = prefix.strip("/")

    async def chunk_model(self) -> dict[str, Any]:
        """Write every unit, then the manifest. Returns a summary dict.

        Returns:
            ``{"name", "manifest", "storage", "chunks": [unit names], "num_units", "num_streamed",
            "num_shards", "num_experts", "total_size_mb", "largest_unit_mb", "dtype", "quantize", "architecture"}``

        Raises:
            ChunkingError: an unreadable or mismatched source, or a different model at the target
                (before the source is even opened) without ``force``.
            UnsafeFormatError: pickle files that are not plain tensor state dicts.
        """
        # transformers' expert merges make fresh multi-MiB tensors per layer: on the heap their holes would
        # grow the chunker's memory with the model instead of one layer (memory.pin_mmap_threshold)
        pin_mmap_threshold()
        builder = ModelBuilder(self.storage, self.prefix, name=self.name, force=self.force)
        await builder.check()
        source = await asyncio.to_thread(open_source, self.model_name)
        try:
            plan = await asyncio.to_thread(plan_model, source, self.dtype, self.model_name, self.quantize,
                                           self.shard_size, self.expert_units)
            manifest = await self._write(builder, source, plan)
        finally:
            source.close()
        return self._summary(manifest)

    async def _write(self, builder: ModelBuilder, source: Source, plan: ModelPlan) -> Manifest:
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"chunking {self.name}")
        done = 0

        def report(unit: str, entry: UnitEntry) -> None:
            nonlocal done
            done += entry.data_bytes
            if bar is not None:
                bar.update(entry.data_bytes)
                bar.set_postfix_str(f"unit {len(builder.units)}/{len(plan.units)}")
            if self._on_unit is not None:
                self._on_unit(unit)
            if self._on_progress is not None:
                self._on_progress(ChunkProgress(unit, len(builder.units), len(plan.units), done, plan.total_bytes))

        try:
            for group in plan.groups():
                await self._write_group(builder, group, source, plan, report)
        finally:
            if bar is not None:
                bar.close()
        for fname, data in sorted(source.aux_files().items()):
            await builder.add_file(fname, data)
        return await builder.finish(
            architecture=plan.architecture, model_type=plan.config.model_type, config=plan.config.to_dict(),
            dtype=str(plan.dtype).removeprefix("torch."), tied=plan.tied,
            source=source_id(self.model_name),
        )

    @staticmethod
    async def _write_group(builder: ModelBuilder, group: list[str], source: Source, plan: ModelPlan,
                           report: Callable[[str, UnitEntry], None]) -> None:
        """Write the units of one of ``plan.groups()``, produced by :func:`.produce.produce_group` (the units of
        a row group from ONE read of their tensors) in a worker thread, one unit at a time."""
        role = "expert" if group[0] in plan.experts else None
        units = produce_group(plan, source, group)
        try:
            while (item := await asyncio.to_thread(next, units, None)) is not None:
                unit, buf, digests = item
                del item
                report(unit, await builder.add_encoded_unit(unit, buf, digests=digests, rows=plan.rows_of(unit),
                                                            role=role))
                del buf
        finally:
            units.close()

    def _summary(self, manifest: Manifest) -> dict[str, Any]:
        return {
            "name": manifest.name,
            "manifest": join_key(self.prefix, MANIFEST_FILE),
            "storage": self.storage.location,
            "chunks": [u.name for u in manifest.units],
            "num_units": len(manifest.units),
            "num_streamed": len(manifest.streamed),
            "num_shards": len(manifest.shards),
            "num_experts": len(manifest.experts),
            "total_size_mb": manifest.total_bytes / (1 << 20),
            "largest_unit_mb": max(u.bytes for u in manifest.units) / (1 << 20),
            "dtype": manifest.dtype,
            "quantize": self.quantize,
            "architecture": manifest.architecture,
        }


_S3_LEGACY = {"s3_region": "region_name", "s3_endpoint": "endpoint_url", "aws_access_key_id": "aws_access_key_id",
              "aws_secret_access_key": "aws_secret_access_key", "aws_session_token": "aws_session_token",
              "aws_profile": "profile_name"}


def _s3_options(s3: S3Options | None, legacy: dict[str, Any]) -> S3Options:
    """``s3`` or the original flat keywords as :class:`S3Options` (not both; an unknown keyword is a TypeError)."""
    unknown = sorted(set(legacy) - set(_S3_LEGACY))
    if unknown:
        raise TypeError(f"ModelChunker got unexpected keyword arguments {unknown}")
    given = {_S3_LEGACY[k]: v for k, v in legacy.items() if v is not None}
    if given and s3 is not None:
        raise TypeError(f"pass s3=S3Options(...) or {sorted(legacy)}, not both")
    return s3 if s3 is not None else S3Options(**given)


__all__ = ["ChunkProgress", "ModelChunker", "default_model_name", "map_checkpoint_keys", "parse_dtype"]
