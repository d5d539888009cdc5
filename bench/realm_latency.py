#!/usr/bin/env python3
"""Proxy realm latency: one login checked against a real slapd (plain, StartTLS, ldaps) and a real FreeRADIUS.

Both servers are private instances on loopback, started here with the test
helpers (Debian packages slapd and freeradius), so the figures are the
realm's own cost plus a local directory's, with no network in between: a
floor for what a login through a realm costs. Beside them, the time a login
waits before a down server is reported as unavailable (nothing listening,
and a RADIUS server that never answers: timeout x tries).

Figures are medians and 99th percentiles of sequential logins; the machine
is shared and noisy, so compare the rows with each other.

    python bench/realm_latency.py [--logins 300]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.auth.realms import RealmUnavailable
from services.auth.realms.ldap import LdapRealm
from services.auth.realms.radius import RadiusRealm
from services.config import LdapRealmConfig, RadiusRealmConfig
from tests.helpers.freeradius import FreeRadius
from tests.helpers.server import free_port
from tests.helpers.slapd import READER_DN, SUFFIX, Slapd, make_tls_files, person

PASSWORD = "bench password"
SECRET = "bench-secret"


def measure(label: str, login: Callable[[], object], count: int) -> None:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        login()
        times.append(time.perf_counter() - started)
    times.sort()
    p50 = statistics.median(times) * 1000
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
    print(f"{label:<34} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   {count / sum(times):8.0f} logins/s (one thread)")


def unavailable_after(label: str, login: Callable[[], object]) -> None:
    started = time.perf_counter()
    try:
        login()
    except RealmUnavailable:
        print(f"{label:<34} unavailable after {time.perf_counter() - started:6.3f} s")
    else:
        print(f"{label:<34} UNEXPECTED: answered")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="coterie-realm-bench-") as tmp:
        root = Path(tmp)
        tls = make_tls_files(root / "tls")
        ldap = Slapd(root / "slapd", person("alice", PASSWORD), tls=tls).start()
        radius = FreeRadius(root / "radius", SECRET, {"bob": PASSWORD}).start()
        try:
            run(ldap, radius, str(tls.ca_cert), args.logins)
        finally:
            radius.stop()
            ldap.stop()
    return 0


def run(ldap: Slapd, radius: FreeRadius, ca: str, count: int) -> None:
    def ldap_realm(**kw: object) -> LdapRealm:
        return LdapRealm(LdapRealmConfig(name="corp", base_dn=SUFFIX, **({"url": ldap.url} | kw)), Path("/"))

    def radius_realm(port: int, **kw: object) -> RadiusRealm:
        return RadiusRealm(RadiusRealmConfig(name="radius", server="127.0.0.1", port=port, secret=SECRET, **kw))

    service = {"bind_dn": READER_DN, "bind_password": "reader-pw"}
    cases = {
        "ldap plain, anonymous search": ldap_realm(),
        "ldap plain, service bind": ldap_realm(**service),
        "ldap StartTLS, service bind": ldap_realm(starttls=True, ca_file=ca, **service),
        "ldaps, service bind": ldap_realm(url=ldap.ldaps_url, ca_file=ca, **service),
    }
    for label, subject in cases.items():
        assert subject.authenticate("alice", PASSWORD).ok
        measure(f"{label} (accept)", lambda s=subject: s.authenticate("alice", PASSWORD), count)
    measure("ldap plain, wrong password", lambda: cases["ldap plain, service bind"].authenticate("alice", "x"), count)
    ok = radius_realm(radius.port)
    assert ok.authenticate("bob", PASSWORD).ok
    measure("radius accept", lambda: ok.authenticate("bob", PASSWORD), count)
    measure("radius reject", lambda: ok.authenticate("bob", "wrong"), count)

    unavailable_after("ldap, nothing listening", lambda: ldap_realm(url=f"ldap://127.0.0.1:{free_port()}")
                      .authenticate("alice", PASSWORD))
    unavailable_after("radius, port closed (3 tries)", lambda: radius_realm(free_port()).authenticate("bob", PASSWORD))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        unavailable_after("radius, silent (3 tries x 0.5 s)",
                          lambda: radius_realm(port, timeout=0.5).authenticate("bob", PASSWORD))


if __name__ == "__main__":
    sys.exit(main())
