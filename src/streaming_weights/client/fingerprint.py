"""Verifying a unit fetched again: against a secret fingerprint of the bytes verified before, not BLAKE3 again.

Every unit is first verified against the manifest's BLAKE3 hash, the chain of custody from the (signed)
manifest. A model larger than its budget then fetches every streamed unit again for each token, and those
bytes only have to be *the bytes verified before*. So the second verified fetch of a unit also takes a
**fingerprint** of them: an AES-GMAC tag (AES-GCM over the unit as associated data, nothing encrypted) under
a key and a nonce drawn for that unit from ``os.urandom``. Key, nonce and tag stay in this process: never
sent, stored, logged or shown. Every later fetch of the unit is checked against its fingerprint only, by a
GCM decryptor's tag check; GHASH runs at ~20 GB/s on one core of the reference machine, BLAKE3 at ~6, and
verification is a third of a streaming client's CPU per byte (issue 26).

Why this is sound: it is AES-GCM's own contract, one tag computed once per (key, nonce) and any number of
verification attempts against it. Bytes other than the verified ones pass one check with probability at most
(L + 1) / 2^128, L being the unit's length in 16-byte blocks, so q attempts succeed with probability at most
q (L + 1) / 2^128: a server that sees its refusals (the client fetches again) and tries on every token for 2^30
tokens has under 2^-62 against a 64 GiB unit, the manifest's largest. It never sees the tag it would have to
match; the key is random, not derived from anything it knows. The tag check is OpenSSL's, in constant time.
A re-chunked model has new BLAKE3 hashes in its manifest, so it has no fingerprints yet. Units fetched once
(kept in memory) never pay for a fingerprint. Units a client's plan streams (fetched again on every pass) take
theirs on the first fetch (:meth:`Fingerprints.expect_refetch`), so no fetch of theirs is verified twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from ..exceptions import IntegrityError
from ..format.manifest import BlobEntry
from .verify import check_blake3


#: Most bytes handed to the GMAC in one call: the binding takes a piece's length as a 32-bit int (a whole 2 GiB
#: unit read in one piece, as S3 and the Redis cache hand it over, would panic there).
GMAC_SLICE = 1 << 30


def _refuse_pickle(obj: object) -> None:
    raise TypeError(f"{type(obj).__name__} holds secret keys: it is never pickled or copied out of the process")


@dataclass(frozen=True, repr=False, eq=False)  # no repr: key, nonce and tag are never shown
class _Print:
    key: bytes
    nonce: bytes
    tag: bytes

    __reduce__ = _refuse_pickle  # type: ignore[assignment]


def _ident(entry: BlobEntry) -> tuple[str, int]:
    """What a fingerprint is kept under: the unit's manifest BLAKE3 and size (a re-chunked unit starts over)."""
    return entry.blake3, entry.bytes


class Verifier:
    """Checks one fetch of ``entry``'s bytes, fed in order with :meth:`update`; :meth:`check` raises
    IntegrityError unless they are the manifest's (or, once fingerprinted, the bytes verified before)."""

    def __init__(self, book: Fingerprints, entry: BlobEntry, known: _Print | None, take: bool) -> None:
        self._book, self._entry = book, entry
        self._blake3 = None if known is not None else blake3.blake3()
        self._gmac: CipherContext | None = None
        self._new: tuple[bytes, bytes] | None = None  # (key, nonce) of the fingerprint this fetch takes
        if known is not None:
            self._gmac = Cipher(algorithms.AES(known.key), modes.GCM(known.nonce, known.tag)).decryptor()
        elif take:
            self._new = (os.urandom(32), os.urandom(12))
            self._gmac = Cipher(algorithms.AES(self._new[0]), modes.GCM(self._new[1])).encryptor()
        self.nbytes = 0

    @property
    def fingerprinted(self) -> bool:
        """Whether this fetch is checked against a fingerprint (not BLAKE3)."""
        return self._blake3 is None

    def update(self, piece: memoryview | bytes | bytearray) -> None:
        if self._blake3 is not None:
            self._blake3.update(piece)
        if self._gmac is not None:
            view = memoryview(piece).cast("B")
            for at in range(0, len(view), GMAC_SLICE):
                self._gmac.authenticate_additional_data(view[at : at + GMAC_SLICE])
        self.nbytes += len(piece)

    def check(self, where: str) -> None:
        """Raise IntegrityError unless every byte fed matched; a BLAKE3-verified refetch records its fingerprint."""
        e = self._entry
        if self.nbytes != e.bytes:
            raise IntegrityError(f"{e.path} from {where}: {self.nbytes} of {e.bytes} bytes were verified")
        if self._blake3 is None:
            assert self._gmac is not None
            try:
                self._gmac.finalize()
            except InvalidTag:
                raise IntegrityError(
                    f"{e.path} from {where} differs from the bytes verified against its manifest hash when it was "
                    "fetched before (corrupted in storage or in transit); check the server's storage") from None
            self._book.tag_bytes += e.bytes
            return
        check_blake3(e, self._blake3.hexdigest(), where)
        self._book.verified(e)
        if self._new is not None and self._gmac is not None:
            self._gmac.finalize()
            self._book.record(e, _Print(*self._new, self._gmac.tag))


class Fingerprints:
    """The fingerprints of the units one client verified (see the module's doc), by manifest BLAKE3 hash."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._again: set[tuple[str, int]] = set()  # fetched again for certain: fingerprinted on the first fetch
        self._prints: dict[tuple[str, int], _Print] = {}
        #: bytes verified against BLAKE3 / against a fingerprint so far (observability and tests)
        self.blake3_bytes = 0
        self.tag_bytes = 0

    def verifier(self, entry: BlobEntry) -> Verifier:
        """How this fetch of ``entry`` is checked: its fingerprint if it has one; else BLAKE3, taking the
        fingerprint too when the unit was verified before (fetched again: likely again after this)."""
        ident = _ident(entry)
        known = self._prints.get(ident)
        return Verifier(self, entry, known, take=known is None and (ident in self._seen or ident in self._again))

    def expect_refetch(self, entries: Iterable[BlobEntry]) -> None:
        """These units will be fetched again (a plan streams them): their first verified fetch takes the fingerprint
        too, and the second is checked against it alone (instead of BLAKE3 and a fingerprint taken)."""
        self._again.update(map(_ident, entries))

    def verified(self, entry: BlobEntry) -> None:
        """``entry``'s bytes passed BLAKE3 (its next fetch takes a fingerprint)."""
        self._seen.add(_ident(entry))
        self.blake3_bytes += entry.bytes

    def record(self, entry: BlobEntry, fp: _Print) -> None:
        self._prints[_ident(entry)] = fp

    def __len__(self) -> int:
        return len(self._prints)

    def __repr__(self) -> str:  # never the keys or tags
        return f"Fingerprints({len(self._prints)} units)"

    __reduce__ = _refuse_pickle  # type: ignore[assignment]


__all__ = ["Fingerprints", "Verifier"]
