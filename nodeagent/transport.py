"""The wire: raw ESP (IP protocol 50) and the UDP masquerade format, and telling datagrams apart.

UDP masquerade is how ESP crosses a PAT: a UDP header, a 4-byte masquerade
marker, then the ESP packet. The marker is the word 0x000000FE. As an SPI it
lies in 1..255, which IANA reserves and no SA ever uses, so masqueraded ESP
can never be mistaken for RFC 3948 ESP-in-UDP (whose first word is the SPI,
256 or more), nor for RFC 3948's non-ESP marker (0x00000000) or its NAT
keepalive (a single 0xFF byte). What cannot be told apart by its first word
is settled by authentication: nothing changes state before the ICV checks.

The demultiplexer is a pure function so it can be fuzzed (RELIABILITY.md D8).
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import struct
from operator import add
from typing import Any

from nodeagent.constants import ESP_MIN_PACKET_SIZE

log = logging.getLogger(__name__)

MASQUERADE_MARKER = b"\x00\x00\x00\xfe"
NON_ESP_MARKER = b"\x00\x00\x00\x00"
KEEPALIVE = b"\xff"
IPPROTO_ESP = 50
DEFAULT_UDP_PORT = 7871
RECV_SIZE = 65536
SOCKET_BUFFER = 8 << 20  # bytes; bursts of 64 KB super-packets need room (SO_*BUFFORCE passes rmem_max as root)
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
UDP_SEGMENT = 103  # UDP GSO: one sendmsg, many datagrams of this size (the last may be shorter)
UDP_GRO = 104  # UDP GRO: one recvmsg, many datagrams of the size in the cmsg
GSO_MAX_PAYLOAD = 65507  # what one GSO sendmsg may carry in all (EMSGSIZE above)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS is 64 on older kernels, 128 on newer ones
_GSO_SIZE = struct.Struct("=H")
_WORD = struct.Struct("!L")
_MASQUERADE_WORD = int.from_bytes(MASQUERADE_MARKER, "big")
_GRO_SIZE = struct.Struct("=i")

# Per-packet encapsulation overhead on each path, before ESP's own (IPv4 outer header).
OUTER_IPV4 = 20
UDP_HEADER = 8
PATH_OVERHEAD = {"esp": OUTER_IPV4, "udp": OUTER_IPV4 + UDP_HEADER + len(MASQUERADE_MARKER)}


class Kind(enum.Enum):
    ESP = "esp"  # an ESP packet (masqueraded, RFC 3948, or raw)
    KEEPALIVE = "keepalive"
    CONTROL = "control"  # after the non-ESP marker; reserved for hole punching (issue 6)
    GARBAGE = "garbage"


def classify_udp(datagram: bytes | memoryview) -> tuple[Kind, int]:
    """What a datagram on the agent's UDP port is, and where its payload starts; never raises."""
    length = len(datagram)
    if length < 4:
        return (Kind.KEEPALIVE, 1) if length == 1 and datagram[0] == 0xFF else (Kind.GARBAGE, 0)
    head = _WORD.unpack_from(datagram)[0]
    if head == _MASQUERADE_WORD:
        if length - 4 < ESP_MIN_PACKET_SIZE:
            return Kind.GARBAGE, 0
        return Kind.ESP, 4
    if head == 0:  # the non-ESP marker
        return Kind.CONTROL, 4
    if head < 256 or length < ESP_MIN_PACKET_SIZE:
        return Kind.GARBAGE, 0
    return Kind.ESP, 0  # RFC 3948 ESP-in-UDP: the SPI comes first


def strip_ipv4_header(packet: bytes) -> memoryview | None:
    """A raw IPv4 socket hands over the IP header too; the ESP packet starts after it."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    start = (packet[0] & 0x0F) * 4
    if start < 20:  # IHL below 5 is no IPv4 header: without this the header itself would be read as ESP
        return None
    return memoryview(packet)[start:] if len(packet) >= start + ESP_MIN_PACKET_SIZE else None


class Wire:
    """The agent's two sockets: one UDP port for masquerade and keepalives, one raw socket for ESP."""

    def __init__(self, port: int = DEFAULT_UDP_PORT, *, raw_esp: bool = True, mark: int = 0) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind(("0.0.0.0", port))
        self.udp.setblocking(False)
        self.port = self.udp.getsockname()[1]
        self.esp: socket.socket | None = None
        if raw_esp:
            self.esp = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
            self.esp.setblocking(False)
        for sock in self.sockets():
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF)
            if mark:  # policy routing keeps the agent's own encapsulated packets out of its tunnel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        self.send_errors = 0
        # off when the kernel lacks UDP_SEGMENT, or refused a GSO send: then datagrams go one by one
        self.gso = _supported(self.udp, UDP_SEGMENT)
        self.gro = _enable(self.udp, UDP_GRO)
        self._buffers: list[bytearray] = []  # receive buffers, reused by every recv_batch
        self.udp_sends = self.udp_datagrams_sent = self.udp_reads = self.udp_datagrams_read = 0

    def sockets(self) -> list[socket.socket]:
        return [self.udp] + ([self.esp] if self.esp is not None else [])

    def send_udp(self, payload: bytes, address: tuple[str, int], ttl: int | None = None) -> None:
        """Send one datagram; *ttl* sets this datagram's IP TTL only (ancillary data, not the socket's)."""
        if ttl is None:
            self._send(self.udp, payload, address)
            return
        try:
            self.udp.sendmsg([payload], [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack("i", ttl))], 0, address)
        except OSError:
            self.send_errors += 1

    def send_esp(self, packet: bytes, host: str) -> None:
        if self.esp is None:
            raise RuntimeError("raw ESP is off on this agent")
        self._send(self.esp, packet, (host, 0))

    def _send(self, sock: socket.socket, payload: bytes, address: tuple[str, int]) -> None:
        try:
            sock.sendto(payload, address)
        except BlockingIOError:
            self.send_errors += 1  # the socket buffer is full: a drop, as a full link would make
        except OSError as exc:
            self.send_errors += 1
            if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EPERM):
                log.warning("send to %s failed: %s", address, exc)

    def send_udp_batch(self, parts: list[bytes], address: tuple[str, int]) -> None:
        """Send datagrams given as (marker, packet) pairs of buffers, many per system call (UDP GSO).

        A GSO send needs all datagrams but the last of one size, so runs of
        equal size go together, each closed by at most one shorter datagram.
        """
        if len(parts) == 2:  # one datagram (a ping, an ACK): no run to find
            self._send(self.udp, parts[0] + parts[1], address)
            self.udp_sends += 1
            self.udp_datagrams_sent += 1
            return
        if not self.gso:
            for index in range(0, len(parts), 2):
                self._send(self.udp, parts[index] + parts[index + 1], address)
            self.udp_sends += len(parts) // 2
            self.udp_datagrams_sent += len(parts) // 2
            return
        lengths = list(map(len, parts))
        sizes = list(map(add, lengths[0::2], lengths[1::2]))  # per datagram, without a Python loop
        start, count = 0, len(sizes)
        while start < count:
            size = sizes[start]
            limit = min(count, start + GSO_MAX_SEGMENTS, start + GSO_MAX_PAYLOAD // size)
            end = start + 1
            if sizes[end:limit].count(size) == limit - end:  # all one size (a super-packet's segments)
                end = limit
            while end < limit and sizes[end] == size:
                end += 1
            if end < limit and sizes[end] < size:
                end += 1
            self._send_run(parts[2 * start : 2 * end], size, end - start, address)
            self.udp_sends += 1
            start = end
        self.udp_datagrams_sent += count

    def _send_run(self, parts: list[bytes], size: int, count: int, address: tuple[str, int]) -> None:
        if count == 1:
            self._send(self.udp, parts[0] + parts[1], address)
            return
        try:
            self.udp.sendmsg(parts, [(socket.SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, address)
        except BlockingIOError:
            self.send_errors += count
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.warning("UDP GSO refused (%s): sending datagrams one by one", exc.strerror)
                self.gso = False
                for index in range(0, len(parts), 2):
                    self._send(self.udp, parts[index] + parts[index + 1], address)
                return
            self.send_errors += count
            if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EPERM):
                log.warning("send to %s failed: %s", address, exc)

    def recv_batch(self, sock: socket.socket, limit: int) -> list[tuple[Any, tuple[str, int]]]:
        """Datagrams waiting now, from up to *limit* reads; the UDP socket's may be memoryviews of reused buffers.

        With UDP GRO one read returns many datagrams of one sender back to
        back, each of the size the cmsg gives (the last may be shorter): they
        are handed on separately, as if read one by one. The buffers are
        reused by the next call, so callers finish with a batch first.
        """
        if sock is self.udp and self.gro:
            return self._recv_gro(limit)
        return self._recv_plain(sock, limit)

    def _recv_gro(self, limit: int) -> list[tuple[Any, tuple[str, int]]]:
        batch: list[tuple[Any, tuple[str, int]]] = []
        buffers = self._buffers
        recvmsg_into = self.udp.recvmsg_into
        space = socket.CMSG_SPACE(_GRO_SIZE.size)
        reads = 0
        for index in range(limit):
            if index == len(buffers):
                buffers.append(bytearray(RECV_SIZE))
            buffer = buffers[index]
            try:
                length, ancillary, _, source = recvmsg_into([buffer], space)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface as ECONNREFUSED on the next read
                log.debug("receive: %s", exc)
                continue
            reads += 1
            view = memoryview(buffer)
            size = length
            for level, kind, data in ancillary:
                if level == socket.SOL_UDP and kind == UDP_GRO:
                    size = _GRO_SIZE.unpack_from(data)[0]
            if not 0 < size < length:
                batch.append((view[:length], source))
                continue
            # one view per datagram: the full ones in one comprehension (no min() per datagram), then the rest
            short = length % size
            batch += [(view[start : start + size], source) for start in range(0, length - short, size)]
            if short:
                batch.append((view[length - short : length], source))
        self.udp_reads += reads
        self.udp_datagrams_read += len(batch)
        return batch

    def _recv_plain(self, sock: socket.socket, limit: int) -> list[tuple[Any, tuple[str, int]]]:
        batch = []
        recvfrom = sock.recvfrom
        for _ in range(limit):
            try:
                batch.append(recvfrom(RECV_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface as ECONNREFUSED on the next read
                log.debug("receive: %s", exc)
                continue
        return batch

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()


def _set_buffer(sock: socket.socket, force: int, plain: int) -> None:
    """SOCKET_BUFFER bytes; the FORCE option passes the sysctl cap and needs CAP_NET_ADMIN, else capped."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _supported(sock: socket.socket, option: int) -> bool:
    """Whether the kernel knows this UDP option (reading it changes nothing; ENOPROTOOPT if unknown)."""
    try:
        sock.getsockopt(socket.SOL_UDP, option)
    except OSError:
        return False
    return True


def _enable(sock: socket.socket, option: int) -> bool:
    try:
        sock.setsockopt(socket.SOL_UDP, option, 1)
    except OSError:
        return False
    return True
