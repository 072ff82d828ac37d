"""Compatibility module: the unit-source pieces now live in :mod:`.base`, :mod:`.verify`,
:mod:`.storage_source`, :mod:`.open` and :mod:`streaming_weights.storage.catalog`."""

from ..storage.catalog import discover_models, pick_model  # noqa: F401  (compatibility)
from .base import FetchedUnit, UnitSource  # noqa: F401
from .open import normalize_uri, open_unit_source  # noqa: F401
from .storage_source import StorageSource  # noqa: F401
from .verify import check_blake3, decode_verified, verify_and_decode, verify_blob  # noqa: F401

__all__ = ["FetchedUnit", "StorageSource", "UnitSource", "check_blake3", "decode_verified", "discover_models",
           "normalize_uri", "open_unit_source", "pick_model", "verify_and_decode", "verify_blob"]
