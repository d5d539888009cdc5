"""A per-source limit on packets that fail authentication (RELIABILITY.md D16).

Coterie has no handshake on the data path (keys come from keydist), so an
unauthenticated packet costs little: an unknown SPI is one dict miss, a
replay is dropped before decryption. What does cost is a packet that names
a live SPI with a forged tag: a full AES-GCM open each. A source that has
failed authentication gets a token bucket (``burst`` at once, ``rate`` a
second); when it is empty, that source's packets are dropped before
decryption and counted. Sources that never failed are not looked at beyond
one dict miss, and the table is bounded (least recently failed forgotten
first), so a flood from spoofed addresses costs a fixed amount of memory.

The data plane never applies the limit to a peer's own known address: an
attacker spoofing it must not be able to silence the real peer (its forged
packets still cost a decryption each, as in WireGuard's cookie-less path).
"""

from __future__ import annotations

from collections import OrderedDict

RATE = 20.0  # failed packets a second a source may cost once its burst is spent
BURST = 5
MAX_SOURCES = 16384  # ~3 MB at most; more spoofed sources than this get a fresh burst when they return


class SourceLimiter:
    def __init__(self, rate: float = RATE, burst: int = BURST, max_sources: int = MAX_SOURCES) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate > 0, burst >= 1 and max_sources >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # host -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        """May a packet from *host* be decrypted? Always, unless *host* has spent its failures."""
        bucket = self._buckets.get(host)
        if bucket is None:
            return True
        tokens, at = bucket
        return min(self.burst, tokens + (now - at) * self.rate) >= 1.0

    def failed(self, host: str, now: float) -> None:
        """A packet from *host* failed authentication: it costs a token."""
        bucket = self._buckets.pop(host, None)
        tokens = self.burst if bucket is None else min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        self._buckets[host] = (max(0.0, tokens - 1.0), now)  # re-inserted last: the most recent failure
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
