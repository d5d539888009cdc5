"""The TUN device: one per agent, carrying every VPN the node is in.

The device is not persistent: the kernel removes it, with its addresses and
routes, when the last descriptor closes, which is also what happens when the
agent crashes. A persistent device of the same name left by something else is
taken over and its addresses flushed, so a new run never inherits stale
routes. Addresses, MTU and routes go through pyroute2 (netlink), not `ip`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent import offload as segments

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
READ_SIZE = 65536 + segments.VNET_SIZE
TUN_PATH = "/dev/net/tun"
_FIB_RULE_INVERT = 0x2  # `ip rule add not fwmark ...`
NATIVE_TABLE = 0x7872  # native addressing: host routes to peers' real addresses, for unmarked packets only
IPPROTO_ESP = 50
NATIVE_PRIORITY = 0x7860  # before the exit-node rules (0x786F..0x7871) and the main table (32766)


class TunError(Exception):
    """The device cannot be made or configured; the message says what to do."""


class Tun:
    """An open TUN device; reads and writes whole IP packets, in batches.

    With *offload* (the default) the device carries a virtio_net_hdr and the
    kernel may hand over 64 KB TCP super-packets with partial checksums:
    ``read_batch`` splits them (nodeagent/offload.py) and ``write_batch``
    coalesces TCP segments back, so callers still see plain IP packets.
    *complete_checksums* makes every packet read carry a finished checksum
    (for peers that cannot take partial ones).
    """

    def __init__(self, name: str, mtu: int, *, offload: bool = True) -> None:
        if len(name.encode()) > 15:
            raise TunError(f"interface name {name!r} is longer than 15 bytes")
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(
                f"cannot open {TUN_PATH}: {exc.strerror} (the data plane needs root or CAP_NET_ADMIN)"
            ) from None
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError as exc:
            os.close(self.fd)
            if exc.errno == errno.EBUSY:
                raise TunError(f"TUN device {name} is in use by another process (another agent?)") from None
            raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
        self.name = name
        self.mtu = mtu
        self.offload = offload
        self.complete_checksums = False
        self.read_errors = 0  # super-packets whose headers did not add up
        self.reads = self.writes = self.packets_written = 0  # how well batching works
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self.tso = False  # the kernel took TUNSETOFFLOAD: reads may be super-packets (a capability, paths.GSO)
        self.udp_gso = True  # runs of equal UDP datagrams are written as one (offload.coalesce) until refused
        if offload:
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                self.tso = True
            except OSError as exc:  # an old kernel: the header stays, the kernel just sends no super-packets
                log.warning("TUN offloads unavailable (%s); packets go one by one", exc.strerror)
        self._ipr = IPRoute()
        self.index = self._ipr.link_lookup(ifname=name)[0]
        self._ipr.flush_addr(index=self.index)
        self._ipr.link("set", index=self.index, mtu=mtu, state="up")
        self._routes: set[tuple[str, str]] = set()  # (cidr, source address)
        self._exit_rules: list[dict[str, object]] = []
        self._native_rules: list[dict[str, object]] = []
        self._native_routes: set[tuple[str, str]] = set()  # (cidr, source address) in NATIVE_TABLE
        log.info("TUN device %s up (index %d, MTU %d)", name, self.index, mtu)

    # ------------------------------------------------------------------ configuration
    def set_addresses(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Make the device's addresses exactly these (address, prefix length) pairs."""
        wanted = {(str(ipaddress.ip_address(a)), p) for a, p in addresses}
        present = {(dict(m["attrs"])["IFA_ADDRESS"], m["prefixlen"]) for m in self._ipr.get_addr(index=self.index)}
        for address, prefix in present - wanted:
            self._ipr.addr("del", index=self.index, address=address, prefixlen=prefix)
        for address, prefix in wanted - present:
            self._ipr.addr("add", index=self.index, address=address, prefixlen=prefix)

    def set_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Make the extra routes through the device exactly these (cidr, preferred source) pairs."""
        wanted = {(str(ipaddress.ip_network(c, strict=False)), s) for c, s in routes}
        for cidr, source in self._routes - wanted:
            self._route("del", cidr, source)
        for cidr, source in wanted - self._routes:
            self._route("replace", cidr, source)
        self._routes = wanted

    def _route(self, action: str, cidr: str, source: str) -> None:
        try:
            self._ipr.route(action, dst=cidr, oif=self.index, prefsrc=source)
        except NetlinkError as exc:
            if action == "del" and exc.code in (errno.ESRCH, errno.ENOENT):
                return
            raise TunError(f"cannot {action} route {cidr} via {self.name}: {exc}") from None

    def route_all_through(self, source: str | None, mark: int, exempt: list[str]) -> None:
        """Exit-node routing: everything not marked *mark* goes through the device, except *exempt* hosts.

        The agent's own ESP sockets carry the mark, so their packets use the
        main table and never enter the tunnel they implement (the loop
        wg-quick avoids the same way); the server's addresses are exempt so
        the control plane never depends on the data plane. *source* None
        removes it all.
        """
        table = mark
        for rule in self._exit_rules:
            with contextlib.suppress(NetlinkError):
                self._ipr.rule("del", **rule)
        self._exit_rules = []
        with contextlib.suppress(NetlinkError):
            self._ipr.route("del", dst="0.0.0.0/0", table=table, oif=self.index)
        if source is None:
            return
        self._ipr.route("replace", dst="0.0.0.0/0", table=table, oif=self.index, prefsrc=source)
        rules = [dict(table=254, priority=table - 2, dst=host, dst_len=32) for host in exempt]
        rules.append(dict(table=254, priority=table - 1, suppress_prefixlen=0))
        rules.append(dict(table=table, priority=table, fwmark=mark, fwmask=0xFFFFFFFF, flags=_FIB_RULE_INVERT))
        for rule in rules:
            self._ipr.rule("add", **rule)
            self._exit_rules.append(rule)

    def set_native_routes(
        self, routes: Iterable[tuple[str, str]], mark: int, exempt: list[str], udp_port: int = 0
    ) -> None:
        """Native addressing: capture what goes to these (cidr, source) peers' real addresses, unless marked.

        A peer's real address is also where the agent's own encapsulated packets
        go, so the host routes sit in a table of their own that only packets
        *without* the agent's socket mark (*mark*) consult; the *exempt* hosts
        (the control server) always use the main table. The encapsulated
        traffic itself (ESP, and UDP from or to *udp_port*) is also sent to the
        main table by protocol and port: incoming packets carry no mark, and
        without that rule strict reverse-path filtering (rp_filter=1) would find
        the peer's address behind the TUN and drop them. No routes: no rules.
        """
        wanted = {(str(ipaddress.ip_network(c, strict=False)), s) for c, s in routes}
        for cidr, _ in self._native_routes - wanted:
            with contextlib.suppress(NetlinkError):
                self._ipr.route("del", dst=cidr, table=NATIVE_TABLE, oif=self.index)
        for cidr, source in wanted - self._native_routes:
            try:
                self._ipr.route("replace", dst=cidr, table=NATIVE_TABLE, oif=self.index, prefsrc=source)
            except NetlinkError as exc:
                raise TunError(f"cannot route {cidr} via {self.name} (native addressing): {exc}") from None
        self._native_routes = wanted
        if bool(wanted) == bool(self._native_rules):
            return
        for rule in self._native_rules:
            with contextlib.suppress(NetlinkError):
                self._ipr.rule("del", **rule)
        self._native_rules = []
        if not wanted:
            return
        rules: list[dict[str, object]] = [
            dict(table=254, priority=NATIVE_PRIORITY - 1, dst=host, dst_len=32) for host in exempt
        ]
        rules.append(dict(table=254, priority=NATIVE_PRIORITY - 2, ip_proto=IPPROTO_ESP))
        if udp_port:
            rules.append(
                dict(table=254, priority=NATIVE_PRIORITY - 3, ip_proto=17, sport_range=f"{udp_port}:{udp_port}")
            )
        rules.append(
            dict(table=NATIVE_TABLE, priority=NATIVE_PRIORITY, fwmark=mark, fwmask=0xFFFFFFFF, flags=_FIB_RULE_INVERT)
        )
        for rule in rules:
            with contextlib.suppress(NetlinkError):  # left by a crashed run (rules outlive the device)
                self._ipr.rule("del", **rule)
            self._ipr.rule("add", **rule)
            self._native_rules.append(rule)

    def set_mtu(self, mtu: int) -> None:
        if mtu != self.mtu:
            self._ipr.link("set", index=self.index, mtu=mtu)
            self.mtu = mtu

    # ------------------------------------------------------------------ packets
    def read_batch(self, limit: int) -> list[bytes]:
        """The packets of up to *limit* reads that are waiting now (none when the device is idle).

        With offloads a packet may be an offload.SuperPacket: one IP packet that stands for many
        segments, split when sealed (``offload.expand``).
        """
        if not self.offload:
            return self._read_plain(limit)
        packets: list[bytes] = []
        readv, fd, buffers, view = os.readv, self.fd, [self._buffer], self._view
        unpack, complete = segments.unpack_read, self.complete_checksums
        for _ in range(limit):
            try:
                length = readv(fd, buffers)
            except BlockingIOError:
                break
            try:
                packets.append(unpack(view[:length], complete=complete))
            except (segments.OffloadError, struct.error):
                self.read_errors += 1
        self.reads += len(packets)
        return packets

    def _read_plain(self, limit: int) -> list[bytes]:
        packets = []
        read = os.read
        for _ in range(limit):
            try:
                packets.append(read(self.fd, READ_SIZE))
            except BlockingIOError:
                break
        return packets

    def write_batch(self, packets: Iterable[bytes | bytearray | memoryview]) -> int:
        """Write packets; returns how many writes the kernel refused (counted by the caller)."""
        if not self.offload:
            return self._write_all(os.write, packets)
        packets = list(packets)
        writes = segments.coalesce(packets, udp=self.udp_gso)
        self.packets_written += len(packets)
        self.writes += len(writes)
        return self._write_all(os.writev, writes)

    def _write_all(self, write: Callable[[int, Any], int], items: Iterable[Any]) -> int:
        refused = 0
        fd = self.fd
        for item in items:
            try:
                write(fd, item)
            except BlockingIOError:
                refused += 1
            except OSError as exc:  # EINVAL for a packet the kernel will not take
                log.debug("TUN write refused: %s", exc)
                refused += 1
                if exc.errno == errno.EINVAL and write is os.writev and item[0][1] == segments.GSO_UDP_L4:
                    self._refuse_udp_gso()
        return refused

    def _refuse_udp_gso(self) -> None:
        """The kernel took no UDP GSO write (before Linux 6.2): that run is lost, later datagrams go one by one."""
        if self.udp_gso:
            self.udp_gso = False
            log.warning("TUN %s: the kernel refuses UDP GSO writes; UDP datagrams are written one by one", self.name)

    def close(self) -> None:
        if self._exit_rules:  # rules are not tied to the device: the kernel would keep them
            self.route_all_through(None, int(self._exit_rules[-1]["table"]), [])  # type: ignore[call-overload]
        for rule in self._native_rules:
            with contextlib.suppress(NetlinkError):
                self._ipr.rule("del", **rule)
        self._native_rules = []
        if self.fd >= 0:
            os.close(self.fd)  # the kernel removes the device, its addresses and its routes
            self.fd = -1
        self._ipr.close()
