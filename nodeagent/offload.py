"""TUN offloads: the virtio_net_hdr, splitting TSO super-packets, and coalescing segments back into one.

With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6) the kernel hands the
agent TCP "super-packets" of up to 64 KB with one header, and leaves the
TCP/UDP checksum *partial*: the field holds the folded pseudo-header sum and
the rest is to be done by whoever transmits. One read then replaces up to
48, which is where a Python data plane gets its speed (docs/performance.md).

ESP on the wire stays one inner packet per ESP packet: ``split`` cuts a
super-packet into MSS-sized IP packets with their own lengths, IP ids, IP
header checksums and TCP sequence numbers. Their TCP checksums stay partial
between Coterie agents (the receiving agent writes them with NEEDS_CSUM, so
its kernel finishes or skips them); ``complete=True`` finishes them here for
anyone else.

On the way in, ``coalesce`` turns consecutive segments of one TCP flow back
into a super-packet (one TUN write instead of up to 45), consecutive equal
datagrams of one UDP flow into a UDP GSO packet (the kernel hands each
datagram to the socket as it was), and marks every
TCP/UDP packet NEEDS_CSUM with the pseudo-header sum in its checksum field:
the kernel then trusts it for local delivery and completes it when it
forwards the packet (a gateway), so what leaves the node is always complete.

References: include/uapi/linux/virtio_net.h, RFC 793 (TCP), RFC 1071 (checksum),
../shared/PERFORMANCE.md (the kernel interface and its pitfalls).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

Buffer = bytes | bytearray | memoryview

VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (native LE)
VNET_SIZE = VNET.size
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # UDP segmentation (USO): the kernel cuts the payload into gso_size datagrams, each its own header
GSO_ECN = 0x80
PLAIN = bytes(VNET_SIZE)  # "nothing to do": every write of a packet that is not TCP/UDP starts with this

PROTO_TCP = 6
PROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
MAX_COALESCED = 65535  # an IPv4 total length; also the TUN's gso_max_size
MAX_SEGMENTS = 64

_H = struct.Struct("!H")
_L = struct.Struct("!L")
_SHAPES: dict[tuple[int, int, int], tuple[struct.Struct, tuple[tuple[int, int], ...]]] = {}  # split's header packs


class OffloadError(ValueError):
    """A super-packet whose headers do not add up; the caller counts and drops it."""


# ---------------------------------------------------------------------------- checksums
def fold(total: int) -> int:
    """Fold a sum of 16-bit words into 16 bits (ones' complement), not complemented."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: Buffer) -> int:
    """The ones' complement sum of *data* as 16-bit big-endian words (RFC 1071), folded.

    A big integer modulo 0xFFFF is that sum (2**16 = 1 mod 0xFFFF), done in C:
    about 40 times faster than a loop over words.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total if total or not any(data) else 0xFFFF


def pseudo_sum(packet: Buffer, l4_length: int, proto: int) -> int:
    """The folded pseudo-header sum (addresses, protocol, L4 length) that a partial checksum field holds."""
    if packet[0] >> 4 == 4:
        addresses = int.from_bytes(packet[12:20], "big") % 0xFFFF
    else:
        addresses = int.from_bytes(packet[8:40], "big") % 0xFFFF
    return fold(addresses + proto + l4_length)


def ipv4_header_checksum(header: bytearray) -> None:
    """Recompute the checksum of the IPv4 header at the start of *header* in place (ip_rcv always checks it)."""
    header[10:12] = b"\0\0"
    header[10:12] = _H.pack(~ones_sum(memoryview(header)[: (header[0] & 0x0F) * 4]) & 0xFFFF)


def complete_checksum(packet: bytearray, start: int, offset: int, proto: int) -> None:
    """Finish a partial checksum in place: the field already holds the pseudo-header sum."""
    value = ~ones_sum(memoryview(packet)[start:]) & 0xFFFF
    if value == 0 and proto == PROTO_UDP:
        value = 0xFFFF  # 0 means "no checksum" in UDP
    packet[start + offset : start + offset + 2] = _H.pack(value)


class Partial(bytes):
    """A TCP/UDP packet whose checksum the TUN left partial (NEEDS_CSUM): the field holds the pseudo-header sum.

    Its transport header starts right after the IP header (IPv4's IHL, IPv6's 40 bytes). The type is
    the mark: whether a packet's checksum is partial cannot be told from its bytes, and whether it may
    leave partial is decided per peer, after routing (``finish`` for a peer without ``csum``).
    """

    __slots__ = ()


def finish(packet: Buffer) -> bytes:
    """*packet* (a Partial) with its TCP/UDP checksum complete, computed afresh.

    Afresh, not from the field: the MSS clamp adjusts a checksum as if it were complete, so a partial
    one it touched no longer holds the pseudo-header sum. Anything but TCP/UDP is returned as it is.
    """
    mutable = bytearray(packet)
    l4 = _l4_start(mutable)
    proto = mutable[9] if mutable[0] >> 4 == 4 else mutable[6]
    offset = TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET if proto == PROTO_UDP else -1
    if offset < 0 or len(mutable) < l4 + offset + 2:
        return bytes(mutable)
    _H.pack_into(mutable, l4 + offset, pseudo_sum(mutable, len(mutable) - l4, proto))
    complete_checksum(mutable, l4, offset, proto)
    return bytes(mutable)


# ---------------------------------------------------------------------------- reading (outbound)
def parse_vnet(buffer: Buffer) -> tuple[int, int, int, int, int, int]:
    """The virtio_net_hdr at the start of a TUN read."""
    return VNET.unpack_from(buffer)


def _l4_start(packet: Buffer) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def split(packet: Buffer, gso_type: int, gso_size: int, csum_start: int, *, complete: bool) -> list[bytes]:
    """Cut a TCP super-packet into IP packets of at most *gso_size* payload bytes each.

    The segments of ``split_parts``, each joined into one packet; with *complete* their TCP
    checksums are finished here (for a peer that cannot take them partial).
    """
    heads, tails = split_parts(packet, gso_type, gso_size, csum_start)
    join = b"".join
    if not complete:
        return [join(pair) for pair in zip(heads, tails, strict=True)]
    l4 = _l4_start(heads[0])
    segments = []
    for pair in zip(heads, tails, strict=True):
        whole = bytearray(join(pair))
        complete_checksum(whole, l4, TCP_CSUM_OFFSET, PROTO_TCP)
        segments.append(bytes(whole))
    return segments


def split_parts(packet: Buffer, gso_type: int, gso_size: int, csum_start: int) -> tuple[list[bytes], list[Buffer]]:
    """A TCP super-packet's segments as (headers, payloads): segment *i* is ``headers[i] + payloads[i]``.

    Each segment gets its own IP length (and, for IPv4, id and header checksum)
    and TCP sequence number; FIN and PSH stay on the last segment, CWR on the
    first. The TCP checksum is the segment's pseudo-header sum (partial).
    Kept apart so that the sealer joins each header and payload once, with
    the ESP trailer (``OutboundSA.seal_into``). The sums that do not change
    between segments are taken once: all full segments share their lengths,
    flags and TCP checksum, so per segment only the id, the IP checksum and
    the sequence number are computed, and the header is one ``Struct.pack``
    of the fields that change between the template's constant pieces
    (``_header_shape``); the payloads are memoryview slices, not copies.
    """
    view = memoryview(packet)
    version = view[0] >> 4
    if gso_type & ~GSO_ECN not in (GSO_TCPV4, GSO_TCPV6) or version != (4 if gso_type & ~GSO_ECN == GSO_TCPV4 else 6):
        raise OffloadError(f"gso_type {gso_type} for an IPv{version} packet")
    l4 = csum_start or _l4_start(view)
    if len(view) < l4 + 20 or gso_size <= 0 or l4 < (20 if version == 4 else 40):
        raise OffloadError("super-packet shorter than its headers")
    header_length = l4 + (view[l4 + 12] >> 4) * 4
    payload = view[header_length:]
    if header_length < l4 + 20 or len(view) < header_length or not payload:
        raise OffloadError("super-packet shorter than its headers")
    template = bytes(view[:header_length])
    struct_, cuts = _header_shape(version, l4, header_length)
    pack = struct_.pack
    pieces = [template[start:end] for start, end in cuts]  # the constant parts, in order
    seq = _L.unpack_from(template, l4 + 4)[0]
    flags = template[l4 + 13]
    if version == 4:
        ip_id = _H.unpack_from(template, 4)[0]
        a, b, c, d, e, f = pieces
        cleared = bytearray(template[:l4])
        cleared[2:6] = bytes(4)  # length and id: added per segment, as is the checksum
        cleared[10:12] = bytes(2)
        # Each segment adds its payload size and id to this sum; for s > 0, ~fold(s) is 0xFFFE - (s - 1) % 0xFFFF.
        ip_base = ones_sum(cleared) + header_length - 1
        addresses = int.from_bytes(template[12:20], "big")
        length_base = header_length
    else:
        ip_id = ip_base = 0
        a, c, d, e, f = pieces
        addresses = int.from_bytes(template[8:40], "big")
        length_base = header_length - 40
    # The partial TCP checksum is fold(pseudo header sum), which for s > 0 is (s - 1) % 0xFFFF + 1.
    pseudo_base = addresses % 0xFFFF + PROTO_TCP + header_length - l4 - 1
    total = len(payload)
    last = -(-total // gso_size) - 1
    tails = [payload[start : start + gso_size] for start in range(0, total, gso_size)]
    # The full segments before the last: one length, one TCP checksum, FIN/PSH (and CWR after the first) off.
    full_flags = flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)
    full_csum = (pseudo_base + gso_size) % 0xFFFF + 1
    full_length = length_base + gso_size
    if version == 4:
        ip_full = ip_base + gso_size
        heads = [
            pack(a, full_length, (ident := (ip_id + i) & 0xFFFF), b, 0xFFFE - (ip_full + ident) % 0xFFFF, c,
                 (seq + i * gso_size) & 0xFFFFFFFF, d, full_flags, e, full_csum, f)
            for i in range(last)
        ]  # fmt: skip
    else:
        heads = [
            pack(a, full_length, c, (seq + i * gso_size) & 0xFFFFFFFF, d, full_flags, e, full_csum, f)
            for i in range(last)
        ]
    bases = (ip_id, ip_base, length_base, pseudo_base)
    if last and flags & TCP_CWR:  # CWR stays on the first segment only
        heads[0] = _segment_header(pack, pieces, version, 0, flags & ~(TCP_FIN | TCP_PSH), gso_size, seq, bases)
    size = total - last * gso_size
    last_flags = flags & ~TCP_CWR if last else flags  # PSH and FIN stay here
    last_seq = (seq + last * gso_size) & 0xFFFFFFFF
    heads.append(_segment_header(pack, pieces, version, last, last_flags, size, last_seq, bases))
    return heads, tails


def _segment_header(
    pack: Callable[..., bytes],
    pieces: list[bytes],
    version: int,
    index: int,
    flags: int,
    size: int,
    tcp_seq: int,
    bases: tuple[int, int, int, int],
) -> bytes:
    """One segment's header, for the segments that differ from the full ones (the first with CWR, the last).

    *bases* are split_parts' (first IP id, IP header sum base, length base, pseudo-header sum base).
    """
    ip_id, ip_base, length_base, pseudo_base = bases
    tcp_csum = (pseudo_base + size) % 0xFFFF + 1
    if version == 4:
        a, b, c, d, e, f = pieces
        ident = (ip_id + index) & 0xFFFF
        ip_csum = 0xFFFE - (ip_base + size + ident) % 0xFFFF
        return pack(a, length_base + size, ident, b, ip_csum, c, tcp_seq, d, flags, e, tcp_csum, f)
    a, c, d, e, f = pieces
    return pack(a, length_base + size, c, tcp_seq, d, flags, e, tcp_csum, f)


def _header_shape(version: int, l4: int, header_length: int) -> tuple[struct.Struct, tuple[tuple[int, int], ...]]:
    """The Struct that packs one segment's header, and where the template's constant pieces are.

    The fields split sets per segment (IPv4: length, id, header checksum;
    IPv6: payload length; TCP: sequence number, flags, checksum) sit between
    byte ranges copied from the super-packet's header. One precompiled pack
    per header shape, cached: cheaper than copying a template and patching
    it with six ``pack_into`` calls.
    """
    key = (version, l4, header_length)
    found = _SHAPES.get(key)
    if found is None:
        rest = header_length - l4 - 18  # TCP urgent pointer and options
        if version == 4:
            # [0:2] | length | id | [6:10] | checksum | [12:l4+4] | seq | [l4+8:l4+13] | flags | [l4+14:l4+16] | csum
            cuts = ((0, 2), (6, 10), (12, l4 + 4), (l4 + 8, l4 + 13), (l4 + 14, l4 + 16), (l4 + 18, header_length))
            fields = f"!2sHH4sH{l4 - 8}sI5sB2sH{rest}s"
        else:
            # [0:4] | payload length | [6:l4+4] | seq | [l4+8:l4+13] | flags | [l4+14:l4+16] | csum
            cuts = ((0, 4), (6, l4 + 4), (l4 + 8, l4 + 13), (l4 + 14, l4 + 16), (l4 + 18, header_length))
            fields = f"!4sH{l4 - 2}sI5sB2sH{rest}s"
        found = _SHAPES[key] = (struct.Struct(fields), cuts)
    return found


class SuperPacket(bytes):
    """A TSO super-packet read from the TUN: routed and filtered once as one IP packet, split when sealed.

    Its IP header is that of every segment but for lengths, ids and
    numbers, so the data plane's decisions hold for all of them. *gso* is
    (gso_type, gso_size, csum_start, complete) for ``segments``.
    """

    gso: tuple[int, int, int, bool]

    def segments(self, complete: bool = False) -> list[bytes]:
        """The segments, their checksums complete if *complete* or the read asked for it, else partial."""
        gso_type, gso_size, csum_start, completed = self.gso
        return split(self, gso_type, gso_size, csum_start, complete=complete or completed)

    def parts(self) -> tuple[list[bytes], list[Buffer]]:
        """The segments as (headers, payloads), for sealing without joining them first (``split_parts``).

        Only for a read whose checksums may stay partial: ``segments(complete=True)`` otherwise.
        """
        gso_type, gso_size, csum_start, _ = self.gso
        return split_parts(self, gso_type, gso_size, csum_start)


def unpack_read(buffer: Buffer, *, complete: bool) -> bytes:
    """One TUN read (virtio_net_hdr + packet) as the IP packet to send, checksums as *complete* says.

    A TSO read comes back as a SuperPacket; a TCP/UDP packet whose checksum stays partial as a Partial
    (anything else with NEEDS_CSUM, such as IPv6 with extension headers before TCP/UDP, is completed here).
    """
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET.unpack_from(buffer)
    packet = memoryview(buffer)[VNET_SIZE:]
    if gso_type != GSO_NONE:
        if len(packet) < 40 or packet[0] >> 4 != (4 if gso_type & ~GSO_ECN == GSO_TCPV4 else 6):
            raise OffloadError(f"gso_type {gso_type} for a packet that is not TCP of that IP version")
        found = SuperPacket(packet)
        found.gso = (gso_type, gso_size, csum_start, complete)
        return found
    if not flags & NEEDS_CSUM:
        return bytes(packet)
    if not complete and len(packet) >= 28 and packet[9 if packet[0] >> 4 == 4 else 6] in (PROTO_TCP, PROTO_UDP):
        return Partial(packet)  # (for IPv4 the kernel's csum_start is always the IHL, as Partial assumes)
    if len(packet) >= csum_start + csum_offset + 2:
        mutable = bytearray(packet)
        complete_checksum(mutable, csum_start, csum_offset, mutable[9] if mutable[0] >> 4 == 4 else mutable[6])
        return bytes(mutable)
    return bytes(packet)


def expand(packets: Sequence[bytes]) -> list[bytes]:
    """The packets with every SuperPacket replaced by its segments, in order."""
    if not any(type(p) is SuperPacket for p in packets):
        return list(packets)
    out: list[bytes] = []
    for packet in packets:
        if type(packet) is SuperPacket:
            out += packet.segments()
        else:
            out.append(packet)
    return out


# ---------------------------------------------------------------------------- writing (inbound)
_RUN_KEYS: dict[tuple[int, int, int], struct.Struct] = {}
_RUN_FIELDS: dict[tuple[int, int, int], struct.Struct] = {}
_SEQ_FLAGS = struct.Struct("!L5xB")  # from the TCP header's sequence number: seq, then the flags byte


def _run_key_struct(packet: Buffer, l4: int, header_length: int) -> struct.Struct:
    """The unpack that reads what must be equal for two segments to join, for this header shape.

    The IP header bar length/id/checksum, the ports, the ack, the TCP data offset and the options;
    one precompiled unpack (pad bytes skip the rest) is cheaper than slicing them out one by one.
    A candidate whose key equals the run's has the run's header shape too (IHL and data offset are in it).
    """
    version = packet[0] >> 4
    shape = (version, l4, header_length)
    key = _RUN_KEYS.get(shape)
    if key is None:
        options = header_length - l4 - 20
        # IPv4: version, tos | length, id | flags, ttl, proto | checksum | addresses, options;
        # IPv6: version, class, flow | payload length | next header, hops, addresses.
        ip = f"2s4x4s2x{l4 - 12}s" if version == 4 else "4s2x34s"
        # ports | seq | ack | data offset | flags, window, checksum, urgent | options
        key = _RUN_KEYS[shape] = struct.Struct(f"!{ip}4s4x4s1s7x{options}s")
    return key


def _partial_header(packet: Buffer, l4: int, header_length: int, proto: int, l4_length: int) -> bytearray:
    header = bytearray(packet[:header_length])
    offset = TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET
    _H.pack_into(header, l4 + offset, pseudo_sum(header, l4_length, proto))
    return header


def _run_fields_struct(version: int, l4: int, header_length: int) -> struct.Struct:
    """The unpack of everything a full segment must match to join a run, sequence number and flags included.

    Eight fields for either IP version (the IP header bar length/id/checksum in three pieces, ports,
    seq, ack, data offset with flags, options), so the expected values are one tuple built from
    locals per segment: one unpack and one compare decide the common case.
    """
    shape = (version, l4, header_length)
    fields = _RUN_FIELDS.get(shape)
    if fields is None:
        ip = f"2s4x4s2x{l4 - 12}s" if version == 4 else "4s2x2s32s"
        fields = _RUN_FIELDS[shape] = struct.Struct(f"!{ip}4sI4sH6x{header_length - l4 - 20}s")
    return fields


def coalesce(packets: Sequence[Buffer], udp: bool = True) -> list[list[Buffer]]:
    """The TUN writes (each a list of buffers for writev) for these inner packets, in order.

    Consecutive TCP segments of one flow with contiguous sequence numbers,
    equal-sized payloads (the last may be shorter) and no flags beyond ACK
    (PSH allowed on the last) become one super-packet with NEEDS_CSUM.
    Consecutive UDP datagrams of one flow with equal lengths become one
    GSO_UDP_L4 packet (unless *udp* is False: a kernel before 6.2 refuses
    those writes, see ``Tun.write_batch``); a packet flood is then one TUN
    write per GRO read instead of one per datagram. Other TCP and UDP
    packets are written one by one with NEEDS_CSUM; the rest (ICMP,
    fragments, anything else) plain.

    A full-sized, ACK-only segment that continues the run is recognised by
    one unpack compared with the values it must have (``_run_fields_struct``);
    anything else (the run's first segment, a shorter or PSH segment, another
    flow) takes the detailed checks.
    """
    writes: list[list[Buffer]] = []
    run: list[Buffer] = []  # payloads of the open run
    run_header = bytearray()
    run_key: tuple[bytes, ...] = ()
    key_struct = _SEQ_FLAGS  # the open run's _run_key_struct
    l4 = header_length = size_limit = 0  # the open run's shape and segment size
    next_seq = 0
    total = 0
    room = False  # may a full segment still join (no shorter or PSH segment joined yet, under the limits)
    fields_of = _SEQ_FLAGS.unpack_from  # the open run's _run_fields_struct, and the values a next segment has
    ip_a = ip_b = ip_c = ports = ack = options = b""
    offset_ack = 0
    full_runs = 0  # how many segments of size_limit the run may hold (MAX_COALESCED, MAX_SEGMENTS)

    udp_run: list[Buffer] = []  # payloads of the open UDP run, all of one size
    udp_first: Buffer = b""  # its first datagram, whose header the run's write carries
    udp_fields = _SEQ_FLAGS.unpack_from  # the open UDP run's _udp_key_struct
    udp_key: tuple[bytes, ...] = ()
    udp_length = udp_header_length = udp_room = 0  # its datagrams' length, header length, most datagrams it takes

    def close_run() -> None:
        if run:
            writes.append(_write_run(run_header, (l4, header_length, size_limit, total - header_length), run))
            run.clear()

    def close_udp_run() -> None:
        if len(udp_run) > 1:
            writes.append(_write_udp_run(udp_first, udp_header_length, udp_run))
        elif udp_run:
            writes.append(_single(udp_first))
        udp_run.clear()

    for packet in packets:
        if udp_run:  # the next datagram of the open UDP run: the same length, and the same headers bar id/checksums
            if len(packet) == udp_length and len(udp_run) < udp_room and udp_fields(packet) == udp_key:
                udp_run.append(packet[udp_header_length:])
                continue
            close_udp_run()
        if run:
            size = len(packet) - header_length
            if (
                room
                and size == size_limit
                and fields_of(packet) == (ip_a, ip_b, ip_c, ports, next_seq, ack, offset_ack, options)
            ):
                run.append(packet[header_length:])  # a view of a view, or a copy: cheaper than a new memoryview
                next_seq = (next_seq + size) & 0xFFFFFFFF
                total += size
                room = len(run) < full_runs
                continue
            # The next segment of the open run? Its key (which fixes the shape) first, then seq and flags.
            if size > 0 and key_struct.unpack_from(packet) == run_key:
                seq, flags = _SEQ_FLAGS.unpack_from(packet, l4 + 4)
                if (
                    seq == next_seq
                    and not flags & ~(TCP_ACK | TCP_PSH)
                    and size <= size_limit
                    and len(run[-1]) == size_limit
                    and not run_header[l4 + 13] & TCP_PSH
                    and total + size <= MAX_COALESCED
                    and len(run) < MAX_SEGMENTS
                ):
                    run.append(packet[header_length:])
                    next_seq = (seq + size) & 0xFFFFFFFF
                    total += size
                    if flags & TCP_PSH:
                        run_header[l4 + 13] |= TCP_PSH
                    room = False  # after a shorter or PSH segment nothing joins (the checks above say so too)
                    if size == size_limit and not flags & TCP_PSH:
                        room = len(run) < full_runs
                    continue
            close_run()
        shape = _tcp_shape(packet)
        if shape is None:
            udp_shape = _udp_shape(packet) if udp else None
            if udp_shape is None:
                writes.append(_single(packet))
                continue
            key_of, udp_header_length = udp_shape
            udp_first, udp_fields, udp_length = packet, key_of.unpack_from, len(packet)
            udp_key = udp_fields(packet)
            udp_room = min(MAX_SEGMENTS, (MAX_COALESCED - udp_header_length) // (udp_length - udp_header_length))
            udp_run.append(packet[udp_header_length:])
            continue
        l4, header_length, seq, flags = shape
        size = len(packet) - header_length
        if size == 0 or flags & ~(TCP_ACK | TCP_PSH):
            writes.append(_single(packet))
            continue
        run_header = bytearray(packet[:header_length])
        version = packet[0] >> 4
        key_struct = _run_key_struct(packet, l4, header_length)
        run_key = key_struct.unpack_from(packet)
        fields_of = _run_fields_struct(version, l4, header_length).unpack_from
        ip_a, ip_b, ip_c, ports, _, ack, offset_flags, options = fields_of(packet)
        offset_ack = offset_flags & 0xFF00 | TCP_ACK
        size_limit = size
        full_runs = min(MAX_SEGMENTS, (MAX_COALESCED - header_length) // size)
        room = not flags & TCP_PSH and full_runs > 1
        run.append(packet[header_length:])
        next_seq = (seq + size) & 0xFFFFFFFF
        total = header_length + size
    close_run()
    close_udp_run()
    return writes


_UDP_KEYS: dict[tuple[int, int], struct.Struct] = {}


def _udp_shape(packet: Buffer) -> tuple[struct.Struct, int] | None:
    """(the unpack of what its run's datagrams share, header length) of a datagram that may start a UDP run.

    An unfragmented UDP datagram with a payload, whose IP and UDP lengths are those of the packet (a
    datagram shorter than its packet would not survive being cut again). What the run's datagrams
    share: the whole IP header but for id and checksum (so lengths, addresses, TTL, DF and no
    fragment), the ports and the UDP length; with equal packet lengths that makes them segments the
    kernel can cut apart again with the same headers.
    """
    size = len(packet)
    if size < 28:
        return None
    version = packet[0] >> 4
    if version == 4:
        l4 = (packet[0] & 0x0F) * 4
        if packet[9] != PROTO_UDP or l4 < 20 or _H.unpack_from(packet, 2)[0] != size:
            return None
        if _H.unpack_from(packet, 6)[0] & 0x3FFF:  # MF or an offset: a fragment
            return None
    elif version == 6 and size >= 48 and packet[6] == PROTO_UDP and _H.unpack_from(packet, 4)[0] == size - 40:
        l4 = 40
    else:
        return None
    if size <= l4 + 8 or _H.unpack_from(packet, l4 + 4)[0] != size - l4:
        return None
    key = _UDP_KEYS.get((version, l4))
    if key is None:
        # IPv4: version, tos, length | id | flags, fragment, ttl, proto | checksum | addresses, options;
        # IPv6: version, class, flow, payload length | next header, hops, addresses. Then ports and length.
        ip = f"4s2x4s2x{l4 - 12}s" if version == 4 else "6s34s"
        key = _UDP_KEYS[(version, l4)] = struct.Struct(f"!{ip}6s")
    return key, l4 + 8


def _write_udp_run(first: Buffer, header_length: int, payloads: list[Buffer]) -> list[Buffer]:
    """One GSO_UDP_L4 write for datagrams of equal size: *first*'s headers with the lengths of all."""
    header = bytearray(first[:header_length])
    l4 = header_length - 8
    size = len(payloads[0])
    length = 8 + size * len(payloads)  # the UDP length of the whole, which the pseudo-header sum covers
    if header[0] >> 4 == 4:
        _H.pack_into(header, 2, l4 + length)
        ipv4_header_checksum(header)
    else:
        _H.pack_into(header, 4, length)
    _H.pack_into(header, l4 + 4, length)
    _H.pack_into(header, l4 + UDP_CSUM_OFFSET, pseudo_sum(header, length, PROTO_UDP))
    return [VNET.pack(NEEDS_CSUM, GSO_UDP_L4, header_length, size, l4, UDP_CSUM_OFFSET), header, *payloads]


def _tcp_shape(packet: Buffer) -> tuple[int, int, int, int] | None:
    """(L4 offset, header length, seq, flags) of an unfragmented TCP packet without IPv6 extension headers."""
    if len(packet) < 40:
        return None
    version = packet[0] >> 4
    if version == 4:
        if packet[9] != PROTO_TCP or _H.unpack_from(packet, 6)[0] & 0x3FFF:  # MF or an offset: a fragment
            return None
        l4 = (packet[0] & 0x0F) * 4
    elif version == 6 and packet[6] == PROTO_TCP:
        l4 = 40
    else:
        return None
    if len(packet) < l4 + 20:
        return None
    header_length = l4 + (packet[l4 + 12] >> 4) * 4
    if header_length < l4 + 20 or len(packet) < header_length:
        return None
    return l4, header_length, _L.unpack_from(packet, l4 + 4)[0], packet[l4 + 13]


def _write_run(header: bytearray, meta: tuple[int, int, int, int], payloads: list[Buffer]) -> list[Buffer]:
    l4, header_length, size, length = meta  # length: of all payloads, which coalesce added up as they joined
    if len(payloads) == 1:
        gso_type, gso_size = GSO_NONE, 0
    else:
        gso_type, gso_size = (GSO_TCPV4 if header[0] >> 4 == 4 else GSO_TCPV6), size
    if header[0] >> 4 == 4:
        _H.pack_into(header, 2, header_length + length)
        ipv4_header_checksum(header)
    else:
        _H.pack_into(header, 4, header_length - 40 + length)
    _H.pack_into(header, l4 + TCP_CSUM_OFFSET, pseudo_sum(header, header_length - l4 + length, PROTO_TCP))
    vnet = VNET.pack(NEEDS_CSUM, gso_type, header_length, gso_size, l4, TCP_CSUM_OFFSET)
    return [vnet, header, *payloads]


def _single(packet: Buffer) -> list[Buffer]:
    """One packet: TCP/UDP with NEEDS_CSUM and its pseudo-header sum, anything else as it is."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        proto = packet[9]
        l4 = (packet[0] & 0x0F) * 4
        if _H.unpack_from(packet, 6)[0] & 0x3FFF:
            return [PLAIN, packet]  # a fragment: its checksum covers the whole datagram, not this piece
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        proto = packet[6]
        l4 = 40
    else:
        return [PLAIN, packet]
    if proto == PROTO_TCP and len(packet) >= l4 + 20:
        header_length, offset = max(l4 + 20, l4 + (packet[l4 + 12] >> 4) * 4), TCP_CSUM_OFFSET
    elif proto == PROTO_UDP and len(packet) >= l4 + 8:
        header_length, offset = l4 + 8, UDP_CSUM_OFFSET
    else:
        return [PLAIN, packet]
    if len(packet) < header_length:
        return [PLAIN, packet]
    header = _partial_header(packet, l4, header_length, proto, len(packet) - l4)
    vnet = VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, l4, offset)
    return [vnet, header, memoryview(packet)[header_length:]]
