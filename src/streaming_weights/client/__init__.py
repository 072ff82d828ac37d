"""Client side: unit sources (server transport, storage), the unit cache and the prefetcher."""

from .source import FetchedUnit, StorageSource, UnitSource, open_unit_source

__all__ = ["FetchedUnit", "StorageSource", "UnitSource", "open_unit_source"]
