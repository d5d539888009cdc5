"""NAT discovery: what the server's UDP reflector saw of this node's data-plane socket.

The agent sends a probe from the very socket that carries its ESP, so the
mapping the reflector observes is the one peers will meet. The reflector
answers twice: from the port probed, and from the next port. The first
answer tells the mapped address and port; whether the second one arrives
tells whether the NAT lets in packets the node never sent to (a 1:1 NAT
does, a PAT's connection tracking does not). The same probe also goes to a
third port (the first + 2; never the second, whose answers must stay
unsolicited), which answers with what it saw: a different mapped port there
means the NAT maps per destination ("hard", endpoint-dependent mapping), so
the port the server saw is not the one a peer will meet, and hole punching
between two such nodes cannot work. No answer at all means UDP does not get
out: the node is firewalled.

Messages travel after the RFC 3948 non-ESP marker (four zero bytes), so the
data plane's demultiplexer never takes them for ESP:

    probe:  0000 0000 "CTRP" nonce(8)
    answer: 0000 0000 "CTRA" nonce(8) kind(1) ipv4(4) port(2)
            kind 0: from the main port, to a probe there; 1: from the other port (+1), to that
            same probe; 2: from the mapping port (+2), to a probe sent there
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from nodeagent.transport import NON_ESP_MARKER

PROBE_MAGIC = b"CTRP"
ANSWER_MAGIC = b"CTRA"
_ANSWER = struct.Struct("!4s4s8sB4sH")
PROBE_SIZE = len(NON_ESP_MARKER) + 4 + 8
ANSWER_SIZE = _ANSWER.size
PROBE_WAIT = 1.5  # seconds to wait for both answers before concluding
PROBE_INTERVAL = 30.0  # seconds between probes (a NAT may remap; roaming changes everything)
PROBE_TRIES = 3  # probes sent before concluding that UDP is blocked
BLOCKED_INTERVAL = 10.0  # seconds between probes while UDP is blocked: its return moves peers back to UDP sooner

OPEN = "open"  # the other port's answer arrived: unsolicited packets get in (public host or 1:1 NAT)
RESTRICTED = "restricted"  # only answers from where we sent get in (a PAT, or a stateful firewall)
BLOCKED = "blocked"  # no answer: UDP does not get out
INDEPENDENT = "independent"  # both ports saw one mapping: peers meet the port the server saw
DEPENDENT = "dependent"  # the NAT maps per destination (hard): no one can predict the port toward a peer


def probe(nonce: bytes) -> bytes:
    return NON_ESP_MARKER + PROBE_MAGIC + nonce


def parse_probe(datagram: bytes) -> bytes | None:
    """The nonce of a probe, or None for anything else."""
    if len(datagram) != PROBE_SIZE or datagram[:8] != NON_ESP_MARKER + PROBE_MAGIC:
        return None
    return datagram[8:16]


def answer(nonce: bytes, kind: int, address: tuple[str, int]) -> bytes:
    return _ANSWER.pack(NON_ESP_MARKER, ANSWER_MAGIC, nonce, kind, bytes(map(int, address[0].split("."))), address[1])


def parse_answer(datagram: bytes) -> tuple[bytes, int, str] | None:
    """(nonce, kind, "ip:port" seen) of a reflector answer, or None."""
    if len(datagram) != ANSWER_SIZE:
        return None
    marker, magic, nonce, kind, ip, port = _ANSWER.unpack(datagram)
    if marker != NON_ESP_MARKER or magic != ANSWER_MAGIC or kind not in (0, 1, 2):
        return None
    return nonce, kind, f"{'.'.join(map(str, ip))}:{port}"


@dataclass
class NatReport:
    mapped: str = ""  # "ip:port" the reflector saw; "" before the first answer
    filtering: str = ""  # OPEN, RESTRICTED, BLOCKED; "" before the first conclusion
    mapping: str = ""  # INDEPENDENT, DEPENDENT; "" when the second port did not answer


class NatProbe:
    """One round of probing at a time; the data plane feeds it answers, the control loop reads the report."""

    def __init__(self) -> None:
        self.report = NatReport()
        self._nonce = b""
        self._sent_at = 0.0
        self._tries = 0
        self._mapped = ""
        self._other = False
        self._second = ""  # the mapping the other port saw
        self._next = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next

    def soon(self) -> None:
        """Probe at the next chance: a punch failed, so our mapping toward peers may differ from the last seen."""
        if not self._nonce:
            self._next = 0.0

    def start(self, now: float) -> bytes:
        """A probe to send now (a new nonce per round; the same round retries up to PROBE_TRIES)."""
        if not self._nonce or self._tries >= PROBE_TRIES:
            self._nonce, self._tries, self._mapped, self._other, self._second = os.urandom(8), 0, "", False, ""
        self._tries += 1
        self._sent_at = now
        self._next = now + PROBE_WAIT
        return probe(self._nonce)

    def on_answer(self, datagram: bytes) -> bool:
        """Take a reflector's answer; True if it belonged to the current round."""
        parsed = parse_answer(datagram)
        if parsed is None or not self._nonce or parsed[0] != self._nonce:
            return False
        if parsed[1] == 0:
            self._mapped = parsed[2]
        elif parsed[1] == 1:
            self._other = True
        else:
            self._second = parsed[2]
        return True

    def conclude(self, now: float) -> bool:
        """After PROBE_WAIT: update the report; True if it changed. Schedules the next round."""
        if not self._nonce or now - self._sent_at < PROBE_WAIT:
            return False
        if self._mapped:
            mapping = "" if not self._second else INDEPENDENT if self._second == self._mapped else DEPENDENT
            new = NatReport(self._mapped, OPEN if self._other else RESTRICTED, mapping)
        elif self._tries < PROBE_TRIES:
            return False  # try again before calling it blocked
        else:
            new = NatReport("", BLOCKED)
        self._nonce, self._tries = b"", 0
        self._next = now + (BLOCKED_INTERVAL if new.filtering == BLOCKED else PROBE_INTERVAL)
        changed = new != self.report
        self.report = new
        return changed
