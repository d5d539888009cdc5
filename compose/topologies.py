"""Topologies built in a Lab: the benchmark's two hosts, and sites behind NAT, PAT and firewall boxes.

two_hosts (the shape of ../shared/bench/vpnbench, same addresses)::

    A (eth0 10.201.1.2/24) --- ra 10.201.1.1 [R, forwards] rb 10.201.2.1 --- B (eth0 10.201.2.2/24)
    default via 10.201.1.1                                                  default via 10.201.2.1

sites_behind (R is "the internet"; a server placed in R listens on 203.0.113.1 on R's loopback)::

                         R: lo 203.0.113.1/32, forwards
             s0 198.18.0.1/24    s1 198.18.1.1/24 ...   (one link per site)
                  |                   |
      box0 wan 198.18.0.2      h1a wan 198.18.1.2       kind "public": the host sits on the link itself
      [nat|pat|firewall]
      br0 192.168.0.1/24 (the site LAN)
         |          |
      h0a .10     h0b .11     (hosts ``h<site>a``, ``h<site>b``; default via the box)

The boxes are nftables rulesets in the box's namespace:

- ``nat_box``: 1:1 NAT, static DNAT + SNAT between one public and one inside address per mapping.
- ``pat_box``: masquerade (port translation), optionally with randomised ports.
- ``firewall_box``: only new TCP connections to port 443 (or the ports given) leave the LAN; replies
  of established connections come back; everything else is dropped. It also masquerades by default,
  as the firewalls of real networks do.
- ``add_loss``: random loss on whatever a box or router forwards (nftables numgen).
- ``add_delay``: delay on what a router forwards, through a small relay over a TUN (no tc netem here).
- ``restart_box`` (a NAT box reboots: its port mappings are forgotten) and ``readdress`` (a node roams).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from compose.netns import ROOT, Host, Lab, LabError, LabProcess, checkout_env

UNDER_A, UNDER_RA = "10.201.1.2", "10.201.1.1"
UNDER_B, UNDER_RB = "10.201.2.2", "10.201.2.1"
SERVER_ADDR = "203.0.113.1"  # R's loopback address in sites_behind: where a server there listens
KINDS = ("public", "nat", "pat", "pat-random", "firewall")


@dataclass
class TwoHosts:
    a: Host
    r: Host
    b: Host
    a_addr: str = UNDER_A
    b_addr: str = UNDER_B
    ra_addr: str = UNDER_RA
    rb_addr: str = UNDER_RB
    dev: str = "eth0"  # the underlay device in A and B


def two_hosts(lab: Lab) -> TwoHosts:
    """A - R - B as vpnbench builds it: two /24s, forwarding on R, default routes via R."""
    a, r, b = lab.add_host("a"), lab.add_host("r", forward=True), lab.add_host("b")
    lab.link(r, "ra", a, "eth0", f"{UNDER_RA}/24", f"{UNDER_A}/24")
    lab.link(r, "rb", b, "eth0", f"{UNDER_RB}/24", f"{UNDER_B}/24")
    a.run(["ip", "route", "add", "default", "via", UNDER_RA])
    b.run(["ip", "route", "add", "default", "via", UNDER_RB])
    return TwoHosts(a, r, b)


# ------------------------------------------------------------------- boxes
def nat_box(box: Host, wan: str, mappings: dict[str, str]) -> None:
    """1:1 NAT on *box*: each inside -> public pair maps both ways (public is added to *wan* if missing)."""
    pre, post = [], []
    own = set(box.addrs(wan))
    for inside, public in mappings.items():
        if public not in own:
            box.run(["ip", "addr", "add", f"{public}/32", "dev", wan])
        pre.append(f'  iifname "{wan}" ip daddr {public} dnat to {inside}\n')
        post.append(f'  oifname "{wan}" ip saddr {inside} snat to {public}\n')
    box.nft(
        "table ip cotnat {\n"
        " chain pre {\n  type nat hook prerouting priority dstnat; policy accept;\n" + "".join(pre) + " }\n"
        " chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n" + "".join(post) + " }\n"
        "}\n"
    )


def pat_box(box: Host, wan: str, random_ports: bool = False) -> None:
    """Port address translation on *box*: every LAN host leaves as the *wan* address (masquerade).

    Without *random_ports* Linux keeps a source port when it is free (like most
    home routers); with it, every mapping gets a random port (like carrier-grade NAT).
    """
    how = "masquerade fully-random" if random_ports else "masquerade"
    box.nft(
        "table ip cotpat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n"
        f'  oifname "{wan}" {how}\n }}\n}}\n'
    )


def firewall_box(box: Host, wan: str, lan: str, tcp_ports: Sequence[int] = (443,), masquerade: bool = True) -> None:
    """Only new TCP connections from *lan* to *tcp_ports* go out; their replies come back; all else is dropped.

    Drops are counted under the rule comment ``fw-drop`` (``box.nft_counter("cotfw", "fw-drop")``).
    """
    ports = ", ".join(str(int(p)) for p in tcp_ports)
    box.nft(
        "table inet cotfw {\n chain forwarding {\n  type filter hook forward priority filter; policy drop;\n"
        "  ct state established,related accept\n"
        f'  iifname "{lan}" oifname "{wan}" tcp dport {{ {ports} }} ct state new accept\n'
        '  counter drop comment "fw-drop"\n'
        " }\n}\n"
    )
    if masquerade:
        pat_box(box, wan)


def add_loss(host: Host, percent: int) -> None:
    """Drop *percent* % of what *host* forwards, at random (counted under the comment ``loss``)."""
    if not 0 < percent < 100:
        raise ValueError("loss percent must be 1..99")
    host.nft(
        "table inet cotloss {\n chain forwarding {\n  type filter hook forward priority -20; policy accept;\n"
        f'  numgen random mod 100 < {int(percent)} counter drop comment "loss"\n }}\n}}\n'
    )


def add_delay(host: Host, ms: float, devs: Sequence[str], tun: str = "dly0") -> LabProcess:
    """Delay by *ms* every packet *host* forwards that arrives on one of *devs* (see compose/delay.py).

    Give both directions' devices for a round trip of 2 x *ms*. The relay is
    a lab process: it stops with the lab, and its routes vanish with its TUN.
    """
    relay = host.spawn(
        [sys.executable, "-m", "compose.delay", "--tun", tun, "--ms", str(ms)],
        f"delay-{tun}",
        env=checkout_env(),
        cwd=ROOT,
    )
    deadline = time.monotonic() + 15
    while host.run(["ip", "link", "show", tun], check=False).returncode != 0:
        if relay.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"delay relay in {host.name} did not create {tun}: {relay.log_tail()}")
        time.sleep(0.05)
    host.run(["ip", "link", "set", tun, "up"])
    for conf in ("all", tun, *devs):
        host.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
    host.run(["ip", "route", "add", "default", "dev", tun, "table", "77"])
    host.run(["ip", "rule", "add", "iif", tun, "lookup", "main", "priority", "100"])
    for dev in devs:
        host.run(["ip", "rule", "add", "iif", dev, "lookup", "77", "priority", "200"])
    return relay


def restart_box(site: Site) -> None:
    """What a NAT box reboot does to its mappings: every translation is forgotten.

    Taking the wan link down drops the masquerade entries of conntrack (the
    kernel flushes them when the address goes away); static 1:1 NAT keeps
    its rules, as a real box would after a reboot. The default route comes back.
    """
    if site.box is None:
        raise ValueError(f"site {site.index} ({site.kind}) has no box")
    site.box.run(["ip", "link", "set", "wan", "down"])
    site.box.run(["ip", "link", "set", "wan", "up"])
    site.box.run(["ip", "route", "replace", "default", "via", f"198.18.{site.index}.1"])


def readdress(host: Host, dev: str, old: str, new: str, gateway: str) -> None:
    """Move *host* to another address (CIDRs) on *dev*, as a roaming node does; its default route follows."""
    # old first: deleting a primary address also deletes the secondaries of its subnet
    host.run(["ip", "addr", "del", old, "dev", dev])
    host.run(["ip", "addr", "add", new, "dev", dev])
    host.run(["ip", "route", "replace", "default", "via", gateway])


# ------------------------------------------------------------------- sites
@dataclass
class Site:
    index: int
    kind: str
    box: Host | None  # None for kind "public"
    hosts: list[Host]
    addrs: list[str]  # each host's own address
    public: list[str]  # the address each host is seen as from R (the box's for pat and firewall)
    wan_addr: str  # the box's (or the public host's) address on its link to R
    lan: str | None = None  # the site LAN (CIDR), None for kind "public"


@dataclass
class Sites:
    r: Host
    sites: list[Site] = field(default_factory=list)
    server_addr: str = SERVER_ADDR

    def __getitem__(self, index: int) -> Site:
        return self.sites[index]


def sites_behind(
    lab: Lab, kinds: Sequence[str], hosts_per_site: int = 1, loss: int = 0, firewall_ports: Sequence[int] = (443,)
) -> Sites:
    """A public router R and one site per entry of *kinds* (see the module docstring for the picture).

    *hosts_per_site* is 1 or 2 (kind "public" always has one host). *loss* > 0
    puts random loss of that many percent on R's forwarding.
    """
    if not 1 <= hosts_per_site <= 2:
        raise ValueError("hosts_per_site must be 1 or 2")
    if not 1 <= len(kinds) <= 50:
        raise ValueError("1..50 sites")
    r = lab.add_host("r", forward=True)
    r.run(["ip", "addr", "add", f"{SERVER_ADDR}/32", "dev", "lo"])
    result = Sites(r)
    for i, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ValueError(f"unknown site kind {kind!r}; choose from {', '.join(KINDS)}")
        result.sites.append(_site(lab, r, i, kind, hosts_per_site, firewall_ports))
    if loss:
        add_loss(r, loss)
    return result


def _site(lab: Lab, r: Host, i: int, kind: str, count: int, firewall_ports: Sequence[int]) -> Site:
    r_addr, wan_addr = f"198.18.{i}.1", f"198.18.{i}.2"
    if kind == "public":
        host = lab.add_host(f"h{i}a")
        lab.link(r, f"s{i}", host, "wan", f"{r_addr}/24", f"{wan_addr}/24")
        host.run(["ip", "route", "add", "default", "via", r_addr])
        return Site(i, kind, None, [host], [wan_addr], [wan_addr], wan_addr)
    box = lab.add_host(f"box{i}", forward=True)
    lab.link(r, f"s{i}", box, "wan", f"{r_addr}/24", f"{wan_addr}/24")
    box.run(["ip", "route", "add", "default", "via", r_addr])
    lan, gw = f"192.168.{i}.0/24", f"192.168.{i}.1"
    lab.bridge(box, "br0", f"{gw}/24")
    hosts, addrs = [], []
    for j in range(count):
        letter = "ab"[j]
        host = lab.add_host(f"h{i}{letter}")
        addr = f"192.168.{i}.{10 + j}"
        lab.link(box, f"l{letter}", host, "eth0", None, f"{addr}/24")
        lab.enslave(box, f"l{letter}", "br0")
        host.run(["ip", "route", "add", "default", "via", gw])
        hosts.append(host)
        addrs.append(addr)
    if kind == "nat":
        public = [wan_addr] + [f"198.18.{i}.{2 + j}" for j in range(1, count)]
        mappings = dict(zip(addrs, public, strict=True))
        # the first host takes over the box's own wan address: all that arrives for it goes to that host
        nat_box(box, "wan", mappings)
    elif kind in ("pat", "pat-random"):
        pat_box(box, "wan", random_ports=kind == "pat-random")
        public = [wan_addr] * count
    else:
        firewall_box(box, "wan", "br0", firewall_ports)
        public = [wan_addr] * count
    return Site(i, kind, box, hosts, addrs, public, wan_addr, lan)
