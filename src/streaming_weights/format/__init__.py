"""The chunk format: manifest records, unit naming, unit (safetensors) encode/decode, hashing, and
:class:`ModelBuilder`, the one writer of a chunked model (units, files, then the manifest).

Pure data except ``builder``, which writes through any StorageBackend: no torch.nn, no sockets.
"""

from .builder import ModelBuilder, write_model
from .chunkfile import TensorSpec, UnitLayout, decode_unit, encode_tensors, parse_header, plan_unit
from .hashing import Digests, blake3_hex, sha256_file, sha256_hex
from .manifest import FORMAT_VERSION, BlobEntry, Manifest, UnitEntry
from .names import FILES_DIR, MANIFEST_FILE, RESIDENT_UNIT, UNITS_DIR, check_name, file_path, join_key, unit_path

__all__ = [
    "FORMAT_VERSION", "BlobEntry", "Digests", "Manifest", "ModelBuilder", "TensorSpec", "UnitEntry", "UnitLayout",
    "FILES_DIR", "MANIFEST_FILE", "RESIDENT_UNIT", "UNITS_DIR",
    "blake3_hex", "check_name", "decode_unit", "encode_tensors", "file_path", "join_key", "parse_header",
    "plan_unit", "sha256_file", "sha256_hex", "unit_path", "write_model",
]
