"""Refetched units are checked against a secret fingerprint of the bytes verified before (client.fingerprint).

Each case feeds a unit's bytes the way a fetch does (in pieces, split differently each time) and checks
which check ran and that a single changed, missing or extra byte is refused."""

from __future__ import annotations

import os
import random

import pytest

from streaming_weights.client.fingerprint import Fingerprints
from streaming_weights.exceptions import IntegrityError
from streaming_weights.format import blake3_hex, sha256_hex
from streaming_weights.format.manifest import BlobEntry

MiB = 1 << 20


def entry_for(data: bytes, path: str = "units/model.layers.0.safetensors") -> BlobEntry:
    return BlobEntry("model.layers.0", path, len(data), sha256_hex(data), blake3_hex(data))


def fetch(book: Fingerprints, entry: BlobEntry, data: bytes | bytearray, seed: int) -> bool:
    """Feed ``data`` in random pieces (as a network fetch lands), check it; True if a fingerprint checked it."""
    v = book.verifier(entry)
    rng, view, at = random.Random(seed), memoryview(data), 0
    while at < len(data):
        n = rng.choice([1, 7, 4096, MiB, 3 * MiB + 5])
        v.update(view[at : at + n])
        at += n
    v.check("test-server")
    return v.fingerprinted


@pytest.fixture(scope="module")
def unit() -> bytes:
    return os.urandom(5 * MiB + 3)


def test_first_fetches_use_blake3_then_the_fingerprint(unit):
    book, e = Fingerprints(), entry_for(unit)
    assert [fetch(book, e, unit, seed) for seed in range(5)] == [False, False, True, True, True]
    assert book.blake3_bytes == 2 * len(unit) and book.tag_bytes == 3 * len(unit)
    assert len(book) == 1


@pytest.mark.parametrize("where", [0, 1, 2 * MiB + 1, -1])
def test_a_changed_byte_in_a_fingerprinted_refetch_is_refused(unit, where):
    book, e = Fingerprints(), entry_for(unit)
    fetch(book, e, unit, 0)
    fetch(book, e, unit, 1)
    bad = bytearray(unit)
    bad[where] ^= 0x80
    with pytest.raises(IntegrityError, match=r"model\.layers\.0\.safetensors from test-server differs from the "
                                              r"bytes verified"):
        fetch(book, e, bad, 2)
    assert fetch(book, e, unit, 3)  # the fingerprint still holds for the right bytes


@pytest.mark.parametrize("change", ["short", "long"])
def test_a_refetch_of_another_length_is_refused(unit, change):
    book, e = Fingerprints(), entry_for(unit)
    fetch(book, e, unit, 0)
    fetch(book, e, unit, 1)
    other = unit[:-1] if change == "short" else unit + b"\0"
    with pytest.raises(IntegrityError, match="bytes were verified"):
        fetch(book, e, other, 2)


def test_a_refetch_that_fails_blake3_takes_no_fingerprint(unit):
    book, e = Fingerprints(), entry_for(unit)
    fetch(book, e, unit, 0)
    bad = bytearray(unit)
    bad[123] ^= 1
    with pytest.raises(IntegrityError, match="does not match its manifest hash"):
        fetch(book, e, bad, 1)  # the second fetch, which would take the fingerprint
    assert len(book) == 0
    assert fetch(book, e, unit, 2) is False  # still BLAKE3, now taking it from the right bytes
    assert fetch(book, e, unit, 3) is True


def test_a_rechunked_unit_is_verified_against_its_new_hash(unit):
    """Fingerprints are keyed by the manifest's hash: the same name with other bytes starts over with BLAKE3."""
    book = Fingerprints()
    for seed in range(3):
        fetch(book, entry_for(unit), unit, seed)
    new = bytes(reversed(unit))
    assert [fetch(book, entry_for(new), new, seed) for seed in range(3)] == [False, False, True]


def test_each_unit_gets_its_own_key_and_nothing_secret_is_shown(unit):
    book = Fingerprints()
    other = os.urandom(1000)
    for data in (unit, other):
        for seed in range(2):
            fetch(book, entry_for(data), data, seed)
    prints = list(book._prints.values())
    assert len({p.key for p in prints}) == len({p.nonce for p in prints}) == 2
    shown = repr(book) + str(book)
    assert all(p.key.hex() not in shown and p.tag.hex() not in shown for p in prints)


def test_a_failed_first_fetch_does_not_count_as_verified(unit):
    book, e = Fingerprints(), entry_for(unit)
    bad = bytearray(unit)
    bad[-2] ^= 4
    with pytest.raises(IntegrityError, match="does not match its manifest hash"):
        fetch(book, e, bad, 0)
    assert [fetch(book, e, unit, seed) for seed in range(1, 4)] == [False, False, True]
    assert len(book) == 1 and book.blake3_bytes == 2 * len(unit)


def test_keys_are_random_not_derived_from_what_a_server_knows(unit):
    """Two clients fingerprinting the same bytes hold different keys, nonces and tags."""
    books = [Fingerprints(), Fingerprints()]
    for book in books:
        for seed in range(2):
            fetch(book, entry_for(unit), unit, seed)
    (a,), (b,) = (list(book._prints.values()) for book in books)
    assert a.key != b.key and a.nonce != b.nonce and a.tag != b.tag


def test_a_book_is_never_pickled_or_copied(unit):
    import copy
    import pickle

    book = Fingerprints()
    for seed in range(2):
        fetch(book, entry_for(unit), unit, seed)
    for leak in (pickle.dumps, copy.deepcopy, lambda b: pickle.dumps(next(iter(b._prints.values())))):
        with pytest.raises(TypeError, match="holds secret keys"):
            leak(book)


def test_a_piece_longer_than_one_gmac_call_is_fed_in_slices(unit, monkeypatch):
    """The GMAC takes at most GMAC_SLICE bytes per call (its binding's length is a 32-bit int); a longer piece,
    such as a whole unit read at once from S3, is fed in slices and checked like any other."""
    from streaming_weights.client import fingerprint

    monkeypatch.setattr(fingerprint, "GMAC_SLICE", 4093)
    book, e = Fingerprints(), entry_for(unit)
    assert [fetch(book, e, unit, seed) for seed in range(3)] == [False, False, True]
    whole = book.verifier(e)
    whole.update(unit)  # one piece of 5 MiB: 1282 slices
    whole.check("test-server")
    bad = bytearray(unit)
    bad[4093 * 700] ^= 1  # the first byte of a slice
    v = book.verifier(e)
    v.update(bad)
    with pytest.raises(IntegrityError, match="differs from the bytes verified"):
        v.check("test-server")


@pytest.mark.slow
def test_a_unit_over_2_gib_in_one_piece_is_fingerprinted_and_checked():
    """A whole unit of more than 2**31 bytes in one piece (S3, the Redis cache and the default read_into hand a
    unit over at once) is fingerprinted and checked: 2 GiB of memory, a few seconds."""
    data = bytearray((1 << 31) + 1)
    data[-1] = 7
    book, e = Fingerprints(), entry_for(data)
    for expect in (False, False, True):
        v = book.verifier(e)
        v.update(memoryview(data))
        v.check("test-storage")
        assert v.fingerprinted is expect
    data[1 << 30] ^= 1
    v = book.verifier(e)
    v.update(memoryview(data))
    with pytest.raises(IntegrityError, match="differs from the bytes verified"):
        v.check("test-storage")


def test_a_unit_expected_again_is_fingerprinted_on_its_first_fetch(unit):
    """A unit a plan streams (Fingerprints.expect_refetch): BLAKE3 and the fingerprint on the first fetch, the
    fingerprint alone from the second on; a first fetch that fails BLAKE3 takes none."""
    book, e = Fingerprints(), entry_for(unit)
    book.expect_refetch([e])
    bad = bytearray(unit)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match="does not match its manifest hash"):
        fetch(book, e, bad, 9)
    assert len(book) == 0
    assert [fetch(book, e, unit, seed) for seed in range(3)] == [False, True, True]
    assert book.blake3_bytes == len(unit) and book.tag_bytes == 2 * len(unit)
    with pytest.raises(IntegrityError, match="differs from the bytes verified"):
        fetch(book, e, bad, 3)
