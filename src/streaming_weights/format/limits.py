"""Hard bounds on what one manifest may declare, checked before anything is built from it.

A manifest may come from a hostile storage or network path: the byte size and JSON nesting depth are checked
before ``json.loads``; counts, ranks and declared byte sizes before anything is allocated from them. A breach
raises :class:`~streaming_weights.exceptions.ManifestLimitError` naming the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..exceptions import ManifestLimitError


@dataclass(frozen=True)
class ManifestLimits:
    """Hard bounds on what one manifest may declare. Defaults fit any real checkpoint with room to spare
    (a 405B-parameter model's largest unit is ~7 GB in bf16; its manifest well under 10 MB)."""

    max_manifest_bytes: int = 64 << 20
    max_json_depth: int = 32  # real manifests nest 6 deep (units -> unit -> tensors -> tensor -> shape)
    max_units: int = 100_000
    max_files: int = 1_000
    max_tensors: int = 1_000_000  # in the whole manifest
    max_ndim: int = 8
    max_unit_bytes: int = 64 << 30
    max_file_bytes: int = 4 << 30
    max_total_bytes: int = 16 << 40

    def check_bytes(self, data: bytes | bytearray) -> None:
        """Size and nesting depth of the raw JSON, before it is parsed."""
        if len(data) > self.max_manifest_bytes:
            raise ManifestLimitError(f"manifest.json is {len(data)} bytes; the limit is {self.max_manifest_bytes}")
        if json_depth(bytes(data), self.max_json_depth) > self.max_json_depth:
            raise ManifestLimitError(f"manifest.json nests deeper than {self.max_json_depth} levels")

    def check_size(self, size: int, limit: int, what: str, where: str) -> None:
        if size > limit:
            raise ManifestLimitError(f"{where}: declares {what} of {size} bytes; the limit is {limit} bytes "
                                     f"({_human(limit)}): refusing the manifest")

    def check_count(self, count: int, limit: int, what: str, where: str) -> None:
        if count > limit:
            raise ManifestLimitError(f"{where}: {count} {what}; the limit is {limit}")


LIMITS = ManifestLimits()

# A JSON string (escapes included): stripped before counting brackets, so '[' inside names does not count.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_PIECE = 1 << 20


def json_depth(data: bytes, limit: int) -> int:
    """Nesting depth of JSON text, or ``limit + 1`` as soon as it is deeper (unbalanced text: an upper bound).

    Strings are cut out, ``{}`` folded onto ``[]`` and everything else deleted, then the running depth is
    a cumulative sum over 1 MiB pieces: linear time, bounded memory, no recursion (``json.loads`` would
    recurse once per level).
    """
    import numpy as np  # lazily: a server that never sees a big manifest need not import it

    text = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    if b"[" * (limit + 1) in text:  # the plain ``[[[[...`` attack, found by one search
        return limit + 1
    steps = np.frombuffer(text, dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(steps), _PIECE):
        run = np.cumsum(np.where(steps[start:start + _PIECE] == ord("["), 1, -1), dtype=np.int64) + depth
        deepest, depth = max(deepest, int(run.max())), int(run[-1])
        if deepest > limit:
            return limit + 1
    return deepest


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


__all__ = ["LIMITS", "ManifestLimits", "json_depth"]
