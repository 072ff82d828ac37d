"""Client side: where units come from and how they are kept.

Public surface: :class:`UnitSource` / :class:`FetchedUnit` (:mod:`.base`), :class:`StorageSource`,
``transport.WebSocketSource``, ``failover.FailoverSource``, :class:`RetryPolicy` / :class:`RetryingSource`
(:mod:`.retry`, the one place retries happen), :func:`open_unit_source` / :func:`normalize_uri`
(:mod:`.open`), the unit cache (:mod:`.cache`, :mod:`.policy`), buffer reuse (:mod:`.buffers`) and the
sync bridge (:mod:`.bridge`).
"""

from .base import FetchedUnit, UnitSource
from .open import normalize_uri, open_unit_source
from .retry import RetryingSource, RetryPolicy
from .storage_source import StorageSource

__all__ = ["FetchedUnit", "RetryPolicy", "RetryingSource", "StorageSource", "UnitSource", "normalize_uri",
           "open_unit_source"]
