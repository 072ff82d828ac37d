"""Outbound rate limit for a weight server: ``surfing serve --max-rate 1Gbit``.

A server sharing a network with other traffic (or standing in for a slower link in a benchmark) caps the
bytes it sends per second. One :class:`TokenBucket` per server paces every DATA message of every
connection, so the cap holds for the server as a whole, not per client.

The bucket is a GCRA ("virtual scheduling") token bucket: each send of ``n`` bytes reserves ``n / rate``
seconds of the link after the previous reservation; a sender waits only for the part of its reservation
that lies more than ``burst / rate`` in the future. Reservation happens before the await, so concurrent
senders queue in arrival order and the long-run rate never exceeds ``rate`` plus one burst.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Awaitable, Callable

from ..exceptions import ConfigurationError

__all__ = ["TokenBucket", "parse_rate"]

# decimal prefixes: network rates are quoted in powers of ten (1 Gbit/s = 10^9 bit/s)
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(bit|bps|b)?(?:/s|ps)?\s*$", re.IGNORECASE)


def parse_rate(value: str | int | float) -> float:
    """A rate in bytes per second from ``"1Gbit"``, ``"10Gbit"``, ``"500Mbit"``, ``"1.5Gbps"`` (bits per
    second, decimal prefixes), ``"200MB"`` / ``"1GiB"`` (bytes per second) or a plain number of bytes per second.

    Raises:
        ConfigurationError: not a positive rate in one of those spellings.
    """
    if isinstance(value, bool):
        raise ConfigurationError(f"invalid rate {value!r}")
    if isinstance(value, (int, float)):
        rate = float(value)
    else:
        m = _RATE.match(value)
        if m is None:
            raise ConfigurationError(
                f"invalid rate {value!r}: use e.g. 1Gbit, 500Mbit (bits/s) or 200MB (bytes/s)")
        number, prefix, unit = float(m.group(1)), (m.group(2) or "").lower(), m.group(3) or ""
        scale = _BINARY[prefix] if prefix in _BINARY else _PREFIX[prefix]
        # "bit", "bps" and a lower-case "b" are bits; "B", "Bps" (or no unit) are bytes
        bits = unit.lower() == "bit" or unit in ("bps", "b")
        rate = number * scale / (8.0 if bits else 1.0)
    if not rate > 0 or rate == float("inf"):
        raise ConfigurationError(f"invalid rate {value!r}: must be positive and finite")
    return rate


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes per second, allowing bursts of ``burst`` bytes.

    Args:
        rate: bytes per second (see :func:`parse_rate`).
        burst: bytes that may go out back to back; default one 1 MiB DATA message or 5 ms at ``rate``,
            whichever is larger, so a single message never waits on an idle link.
        clock, sleep: injectable time source and sleep (tests); default monotonic time and asyncio.sleep.

    Raises:
        ConfigurationError: a non-positive rate or burst.
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if not rate > 0:
            raise ConfigurationError(f"rate must be positive, got {rate!r}")
        burst = max(float(1 << 20), rate * 0.005) if burst is None else float(burst)
        if not burst > 0:
            raise ConfigurationError(f"burst must be positive, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tat = clock()  # theoretical arrival time: when the link is free of every reservation so far
        #: Seconds senders spent waiting on the bucket (diagnostics).
        self.waited = 0.0

    def reserve(self, n: int) -> float:
        """Reserve ``n`` bytes of the link; return how long the caller must wait before sending them."""
        now = self._clock()
        start = max(self._tat, now)
        self._tat = start + n / self.rate
        return max(0.0, self._tat - now - self.burst / self.rate)

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent without exceeding the rate (reserved on entry)."""
        delay = self.reserve(n)
        if delay > 0:
            self.waited += delay
            await self._sleep(delay)
