"""Central NAT knowledge: a node's class from what it reported, and the path for each pair.

The agent reports its local addresses (host:port of its data-plane socket)
and what the server's reflector saw (nodeagent/natprobe.py). From these the
server classes the node and picks, for every pair, the path both ends use:
there is no in-band detection step, and both ends always agree because they
read the same decision from their views.

Classes: ``public`` (the reflector saw a local address: nothing translates),
``nat`` (translated, but unsolicited packets get in: a 1:1 NAT), ``pat``
(translated and only answers get in: port translation), ``hard`` (a PAT
that maps per destination, so the port toward a peer cannot be known in
advance), ``firewalled`` (no UDP gets out), ``unknown`` (not probed yet).

Paths: ``esp`` (raw IP protocol 50) when neither end is behind PAT or a
firewall; ``udp`` (masquerade) when one end is behind PAT: that end sends
first and its keepalives hold the mapping, the other end answers to where
the first authenticated packet came from; ``punch`` (udp after coordinated
hole punching: both ends learn each other's mapped address from the same view
update and send at once) when both are behind PAT, neither of them hard (a
hard end's mapping toward the peer is unknowable, so punching cannot meet:
those pairs take the relay; a hard end with a reachable peer sends first on
``udp``, which needs no prediction); ``tcp443`` when one end is
firewalled and the other is reachable; ``relay`` (through the server, which
forwards sealed ESP it cannot read) when neither of a firewalled pair can be
reached. An operator's pin (``node set NODE --path P``) wins for any pair
with that node.

Capabilities (what each agent's running data plane reports in its
heartbeat, see CAPS): when both ends report ``gso``, a pair that would take
raw ``esp`` takes ``udp`` instead. A raw socket sends and receives one
packet per system call; UDP has GSO and GRO (tens of packets per call), so
between offloading agents it is several times faster (docs/performance.md:
48 Mbit/s on raw ESP against 400+ on udp). A pin to ``esp`` still wins.
"""

from __future__ import annotations

from collections.abc import Collection

from bus.messages.sync import CAP_CSUM, CAP_GSO

PUBLIC, NAT, PAT, HARD, FIREWALLED, UNKNOWN = "public", "nat", "pat", "hard", "firewalled", "unknown"
CLASSES = (PUBLIC, NAT, PAT, HARD, FIREWALLED, UNKNOWN)
PATHS = ("esp", "udp", "punch", "tcp443", "relay")
PINNABLE = ("esp", "udp", "tcp443", "relay")
REACHABLE = (PUBLIC, NAT)
GSO, CSUM = CAP_GSO, CAP_CSUM  # what agents report (bus/messages/sync.py); only GSO matters to the path
CAPS = (GSO, CSUM)


def classify(endpoints: list[str], mapped: str, filtering: str, mapping: str = "") -> str:
    """The class of a node from its report (see the module docstring)."""
    if filtering == "blocked":
        return FIREWALLED
    if not mapped or filtering not in ("open", "restricted"):
        return UNKNOWN
    if mapped in endpoints:
        return PUBLIC
    if filtering == "open":
        return NAT
    return HARD if mapping == "dependent" else PAT


def choose_path(
    mine: str,
    my_pin: str | None,
    theirs: str,
    their_pin: str | None,
    my_caps: Collection[str] = (),
    their_caps: Collection[str] = (),
) -> str:
    """The path between two nodes of these classes, pins and capabilities; symmetric in its two ends."""
    pins = {p for p in (my_pin, their_pin) if p}
    if "relay" in pins:
        return "relay"
    if "tcp443" in pins:
        return "tcp443" if mine in REACHABLE or theirs in REACHABLE else "relay"
    if FIREWALLED in (mine, theirs):
        other = theirs if mine == FIREWALLED else mine
        return "tcp443" if other in REACHABLE else "relay"
    if "udp" in pins:
        return "udp"
    if mine in (PAT, HARD) and theirs in (PAT, HARD):
        return "relay" if HARD in (mine, theirs) else "punch"
    if PAT in (mine, theirs) or HARD in (mine, theirs) or UNKNOWN in (mine, theirs):
        return "udp"  # also before classification: masquerade works wherever raw ESP does, and more
    if "esp" not in pins and GSO in my_caps and GSO in their_caps:
        return "udp"  # raw ESP has no GSO/GRO: one system call per packet
    return "esp"


def pick_endpoint(viewer_public: str | None, peer_public: str | None, peer_endpoints: list[str]) -> str | None:
    """Where the viewer sends to the peer: its local address when both sit behind the same public address
    (the same LAN: hairpinning through the NAT may not work), else its public mapping, else what it reported."""
    same_site = viewer_public and peer_public and viewer_public.rpartition(":")[0] == peer_public.rpartition(":")[0]
    if peer_public and not same_site:
        return peer_public
    for endpoint in peer_endpoints:
        if ":" in endpoint and "." in endpoint.rpartition(":")[0]:
            return endpoint
    return peer_public


def native_address(endpoint: str | None) -> str | None:
    """The host of an IPv4 "host:port" endpoint: a node's real address in a native VPN (None if unknown)."""
    if not endpoint or ":" not in endpoint:
        return None
    host = endpoint.rpartition(":")[0]
    return host if "." in host else None


def own_native_address(endpoints: list[str]) -> str | None:
    """A node's own real address: the first IPv4 local address it reported (what its applications use)."""
    for endpoint in endpoints:
        host = native_address(endpoint)
        if host:
            return host
    return None
