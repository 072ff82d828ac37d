"""A unit as byte ranges of the original files, when it needs no conversion.

A unit whose tensors are all plain renames of checkpoint tensors, stored in the checkpoint's dtype (no merge,
no cast, no quantization), is its planned safetensors header followed by ranges of the original files (a row
shard or an expert unit of such a tensor: a contiguous range of its rows). Such a unit is read by ``pread``
straight from the files, range by range, with nothing produced or held; the others are produced by the chunker's
:func:`~streaming_weights.chunker.produce.produce_group`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Union

#: ``(offset in the unit, length, literal bytes or (file, offset in the file))``
Piece = tuple[int, int, Union[bytes, tuple[Path, int]]]


def unit_pieces(plan: Any, source: Any, unit: str) -> list[Piece] | None:
    """The pieces unit ``unit`` is made of, in order and tiling it; ``None`` when it needs a conversion."""
    keys = plan.units[unit]
    if not hasattr(source, "locate") or any(k in plan.recipes or k in plan.quant for k in keys):
        return None
    layout = plan.layout(unit)
    rows = plan.rows_of(unit)
    pieces: list[Piece] = [(0, layout.data_start, layout.header)]
    for key in keys:
        path, offset, spec = source.locate(plan.mapping[key])
        if spec.dtype != plan.specs[key][0] or tuple(spec.shape) != tuple(plan.specs[key][1]):
            return None  # a cast (or a shape the plan refuses: producing the unit says so)
        if rows is not None and spec.shape:
            offset += rows[0] * (spec.nbytes // spec.shape[0])
        start, end = layout.span(key)
        pieces.append((start, end - start, (path, offset)))
    pieces.sort(key=lambda p: p[0])  # the layout orders tensors its own way
    assert all(a[0] + a[1] == b[0] for a, b in zip(pieces, pieces[1:])), "a planned unit tiles its file"
    return pieces


def read_pieces(pieces: list[Piece], start: int, length: int, pread: Callable[[Any, int, int], bytes]) -> bytes:
    """Bytes ``[start, start + length)`` of the unit made of ``pieces`` (fewer at its end); ``pread(file, offset,
    length)`` reads a range of a checkpoint file.

    Raises:
        OSError: a file ends before a range it should hold (truncated), or cannot be read.
    """
    out = bytearray()
    stop = start + length
    for at, size, what in pieces:
        lo, hi = max(start, at), min(stop, at + size)
        if lo >= hi:
            continue
        if isinstance(what, bytes):
            out += what[lo - at:hi - at]
            continue
        ref, offset = what
        got = pread(ref, offset + lo - at, hi - lo)
        if len(got) != hi - lo:
            raise OSError(f"{ref} ends before byte {offset + hi - at} (truncated?)")
        out += got
    return bytes(out)


def to_json(pieces: list[Piece] | None) -> list[list[Any]] | None:
    """``pieces`` as JSON (literal bytes as hex, a file by its name in the folder)."""
    if pieces is None:
        return None
    return [[at, size, what.hex() if isinstance(what, bytes) else [Path(str(what[0])).name, what[1]]]
            for at, size, what in pieces]


def from_json(saved: Any) -> list[Piece] | None:
    """:func:`to_json`'s pieces back (``None`` for a unit produced whole, or anything malformed)."""
    try:
        return [(int(at), int(size), bytes.fromhex(what) if isinstance(what, str) else (str(what[0]), int(what[1])))
                for at, size, what in saved]
    except (TypeError, ValueError, IndexError):
        return None


__all__ = ["Piece", "from_json", "read_pieces", "to_json", "unit_pieces"]
