"""The glue between the control loop and the data plane: views to routes, keys to SAs.

The control loop (nodeagent/agent.py) owns the bus connection; the data plane
(nodeagent/dataplane.py) owns the packets; the key ring (nodeagent/keys.py)
owns the schedule. This object is what the loop calls, so that each of those
three stays ignorant of the others: it hands views to the data plane and the
key ring, runs the key ring's requests to keydist, and copies the SAs the
ring wants into the data plane after every change. It also turns each view
into the TCP/443 routes (nodeagent/tcp443.py): for a `tcp443` peer the end
that can reach the other dials it, the other answers on the stream it was
dialled on; `relay` peers go through the relay the server announces.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bus.client import Client
from bus.errors import BusError
from bus.messages import Message
from bus.messages.sync import NodeView
from nodeagent.dataplane import DataPlane, Tunnel
from nodeagent.keys import REKEY_GRACE, REKEY_LEAD, KeyRing, Timing
from nodeagent.natprobe import NatProbe, NatReport
from nodeagent.tcp443 import DEFAULT_PORT as TCP_PORT
from nodeagent.tcp443 import RelaySettings, Route, TcpPaths

log = logging.getLogger(__name__)

KEY_TICK = 0.5  # seconds between key ring ticks (rotation, republish, fetch, SA switch-over)
ENDPOINT_REFRESH = 10.0  # seconds between re-reads of the local addresses (roaming)
REACHABLE = ("public", "nat")  # classes a peer can dial (services/datastore/paths.py)
# A peer on a UDP path that we keep sending to but that has been silent this long (seconds) suggests our
# own UDP is blocked now (D17): probe the reflector at once instead of at the next round (30 s), at most
# every SILENCE_PROBE_EVERY seconds, so that the server reclasses this node and moves its pairs to tcp443.
SILENCE = 4.0
SILENCE_PROBE_EVERY = 10.0
SILENCE_AFTER_DATA = 15.0  # only a pair that carried data this recently: idle pairs hear only keepalives


def timing_for(rekey_interval: float) -> Timing:
    """The key schedule for a rekey interval: lead and grace shrink with short intervals (tests, paranoia).

    They shrink no more than they must: lead is the time a peer has to receive a new key before packets
    sealed with it arrive, grace the time a sender has to switch before the old key stops opening, and
    a busy machine stretches both (a 5 s interval once left lead at 1.25 s: unknown SPIs under load). The
    sender switches at its next key tick after lead, and its main loop may be waiting on a reply then, so
    grace keeps as much room past lead as the interval allows (0.9: 2.5 s past a 2 s lead at 5 s).
    """
    return Timing(
        rekey_interval=rekey_interval,
        lead=min(REKEY_LEAD, rekey_interval * 0.4),
        grace=min(REKEY_GRACE, rekey_interval * 0.9),
    )


def stream_routes(tunnels: list[Tunnel], tcp_port: int = TCP_PORT) -> dict[str, Route]:
    """TcpPaths routes for the peers on a TCP path: a reachable tcp443 peer is dialled at its host (from the
    view's endpoint) on *tcp_port*; any other tcp443 peer dials us (a firewalled one); relay peers use the relay.

    Two reachable ends (an operator's tcp443 pin) both dial: each answers on the stream the other's
    authenticated packets arrive on, so the pair still converges on working streams.
    """
    routes: dict[str, Route] = {}
    for tunnel in tunnels:
        if tunnel.path == "relay":
            routes[tunnel.peer] = Route(relay=True)
        elif tunnel.path == "tcp443":
            dial = tunnel.peer_class in REACHABLE and tunnel.endpoint
            routes[tunnel.peer] = Route(address=(tunnel.endpoint, tcp_port)) if dial else Route()  # type: ignore[arg-type]
    return routes


class Tunnels:
    def __init__(
        self, dataplane: DataPlane, keyring: KeyRing, paths: TcpPaths | None = None, identity: Any = None
    ) -> None:
        self.dataplane = dataplane
        self.keyring = keyring
        self.paths = dataplane.tcp = paths  # None: tcp443 and relay peers stay unreachable (packets held, ICMP)
        self.identity = identity  # the Ed25519 identity key: the relay authenticates us with it
        self.relay: tuple[str, int] | None = None  # the server's relay, from its heartbeat answers
        self._view: NodeView | None = None
        self._silence_probe_at = float("-inf")
        self._next_tick = 0.0
        self._endpoints: list[str] = []
        self._endpoints_at = float("-inf")
        self.dataplane.nat_probe = self.nat_probe = NatProbe()
        self.reflector: tuple[str, int] | None = None

    @classmethod
    def create(
        cls, dataplane: DataPlane, node: str, identity: Any, timing: Timing | None = None, paths: TcpPaths | None = None
    ) -> Tunnels:
        return cls(dataplane, KeyRing(node, identity, time.time(), timing=timing), paths, identity)

    def start(self) -> None:
        self.dataplane.start()

    def close(self) -> None:
        self.dataplane.close()
        if self.paths is not None:
            self.paths.close()

    def apply_view(self, view: NodeView) -> None:
        """A new view: peers gone lose their SAs now (removal takes effect at the next packet)."""
        self.dataplane.apply_view(view)
        self._view = view
        self._route_streams()
        dropped = self.keyring.set_peers({name: peer.sign_key for name, peer in view.peers.items()}, time.time())
        if dropped:
            log.info("peers removed from the view, SAs dropped: %s", ", ".join(sorted(dropped)))
        self._install()

    def on_connect(self) -> None:
        self.keyring.on_connect(time.time())
        self._next_tick = 0.0

    def on_push(self, message: Message) -> None:
        if self.keyring.on_push(message, time.time()):
            self._install()

    def set_reflector(self, address: str) -> None:
        """The server's UDP reflector ("host:port", from its heartbeat answers); probing starts once known."""
        host, _, port = address.rpartition(":")
        new = (host, int(port)) if host and port.isdigit() else None
        if new != self.reflector:
            self.reflector = new
            self.nat_probe = self.dataplane.nat_probe = NatProbe()  # a new server: probe afresh

    def set_relay(self, address: str) -> None:
        """The server's relay ("host:port", from its heartbeat answers; "" when it has none)."""
        host, _, port = address.rpartition(":")
        new = (host.strip("[]"), int(port)) if host and port.isdigit() else None
        if new != self.relay:
            self.relay = new
            self._route_streams()

    def _route_streams(self) -> None:
        """The TCP routes for this view: dial a reachable tcp443 peer, be dialled by the others; relay peers."""
        paths, view = self.paths, self._view
        if paths is None or view is None:
            return
        routes = stream_routes(list(self.dataplane.tunnels.values()))
        paths.set_routes(routes)
        wanted = any(r.relay for r in routes.values()) and self.relay is not None and self.identity is not None
        if wanted:
            assert self.relay is not None
            paths.set_relay(RelaySettings(self.relay[0], self.relay[1], view.node, self.identity))
        else:
            paths.set_relay(None)

    def nat_report(self) -> NatReport:
        return self.nat_probe.report

    def _probe(self, now: float) -> None:
        if self.reflector is None:
            return
        for tunnel in list(self.dataplane.tunnels.values()):
            if tunnel.path == "punch" and not tunnel.last_received and 0 < tunnel.punch_until < now:
                tunnel.punch_until = -1.0  # once per punch: the next view change starts another
                log.info("hole punching to %s got no answer; probing our mapping again", tunnel.peer)
                self.nat_probe.soon()
        if now - self._silence_probe_at >= SILENCE_PROBE_EVERY and self._silent_peer(now):
            self._silence_probe_at = now
            self.nat_probe.soon()
        if self.nat_probe.conclude(now):
            report = self.nat_probe.report
            log.info("NAT discovery: mapped %s, filtering %s", report.mapped or "-", report.filtering)
        if self.nat_probe.due(now):
            probe = self.nat_probe.start(now)
            host, port = self.reflector
            self.dataplane.wire.send_udp(probe, (host, port))
            self.dataplane.wire.send_udp(probe, (host, port + 2))  # the same probe at the mapping port

    def _silent_peer(self, now: float) -> str | None:
        """A peer on a UDP path (esp, udp, punch) that sent data lately, is being sent to, and has gone quiet."""
        for tunnel in list(self.dataplane.tunnels.values()):
            udp = tunnel.path in ("esp", "udp", "punch") and tunnel.outbound is not None
            lately = tunnel.last_data > 0 and now - tunnel.last_data <= SILENCE_AFTER_DATA  # not an idle pair
            if udp and lately and now - tunnel.last_sent < 1.0 and now - tunnel.last_received > SILENCE:
                log.info("peer %s silent for %.0fs while we send: probing our NAT again", tunnel.peer, SILENCE)
                return tunnel.peer
        return None

    def tick(self, client: Client) -> None:
        """Run the key ring's schedule: publish, fetch, switch SAs; at most every KEY_TICK seconds."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + KEY_TICK
        self._probe(now)
        for request in self.keyring.tick(time.time()):
            reply: Message | BusError
            try:
                reply = client.request("keydist", request)
            except BusError as exc:
                reply = exc
                log.debug("keydist: %s", exc)
            self.keyring.on_reply(request, reply, time.time())
        self._install()

    def _install(self) -> None:
        now = time.time()
        for name, state in self.keyring.peers.items():
            self.dataplane.install(name, self.keyring.outbound(name, now), list(state.inbound.values()))

    def endpoints(self) -> list[str]:
        if time.monotonic() - self._endpoints_at >= ENDPOINT_REFRESH:
            try:
                self._endpoints = self.dataplane.endpoints()
            except OSError as exc:
                log.warning("cannot read local addresses: %s", exc)
            self._endpoints_at = time.monotonic()
        return self._endpoints

    def status(self) -> dict[str, Any]:
        doc = self.dataplane.status()
        keys = self.keyring.status(time.time())
        for name, peer in doc["peers"].items():
            peer["keys"] = keys.get(name, {})
        doc["key_counters"] = dict(self.keyring.counters)
        doc["nat"] = {"mapped": self.nat_probe.report.mapped, "filtering": self.nat_probe.report.filtering}
        return doc
