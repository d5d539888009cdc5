"""Central NAT knowledge: a node's class from its report, and each pair's path (services/datastore/paths.py)."""

from __future__ import annotations

import itertools

import pytest

from services.datastore.paths import CAPS, CLASSES, CSUM, GSO, PINNABLE, choose_path, classify

LOCAL = ["192.168.1.10:7871", "10.0.0.5:7871"]


@pytest.mark.parametrize(
    ("mapped", "filtering", "mapping", "expected"),
    [
        ("", "blocked", "", "firewalled"),
        ("", "", "", "unknown"),
        ("198.51.100.7:7871", "", "", "unknown"),
        ("192.168.1.10:7871", "open", "independent", "public"),
        ("198.51.100.7:7871", "open", "independent", "nat"),
        ("198.51.100.7:40000", "restricted", "independent", "pat"),
        ("198.51.100.7:40000", "restricted", "", "pat"),  # the second port never answered: no verdict
        ("198.51.100.7:40000", "restricted", "dependent", "hard"),
        ("198.51.100.7:7871", "open", "dependent", "nat"),  # open filtering: peers get in anyway
    ],
)
def test_classify(mapped: str, filtering: str, mapping: str, expected: str) -> None:
    assert classify(LOCAL, mapped, filtering, mapping) == expected


EXPECTED = {
    ("public", "public"): "esp",
    ("public", "nat"): "esp",
    ("nat", "nat"): "esp",
    ("public", "pat"): "udp",
    ("nat", "pat"): "udp",
    ("pat", "pat"): "punch",
    ("public", "hard"): "udp",  # the hard end sends first; the peer learns its mapping from that
    ("nat", "hard"): "udp",
    ("pat", "hard"): "relay",  # punching needs a predictable port on both ends
    ("hard", "hard"): "relay",
    ("public", "firewalled"): "tcp443",
    ("nat", "firewalled"): "tcp443",
    ("pat", "firewalled"): "relay",
    ("hard", "firewalled"): "relay",
    ("firewalled", "firewalled"): "relay",
    ("unknown", "public"): "udp",
}


@pytest.mark.parametrize(("pair", "path"), list(EXPECTED.items()), ids=["-".join(p) for p in EXPECTED])
def test_choose_path_per_pair_of_classes(pair: tuple[str, str], path: str) -> None:
    assert choose_path(pair[0], None, pair[1], None) == path
    assert choose_path(pair[1], None, pair[0], None) == path  # both ends read the same decision


CAP_SETS = [(), (GSO,), (CSUM,), CAPS]


def test_every_pair_pin_and_caps_gets_a_path_and_it_is_symmetric() -> None:
    pins = [None, *PINNABLE]
    for mine, theirs in itertools.product(CLASSES, repeat=2):
        for my_pin, their_pin in itertools.product(pins, repeat=2):
            for my_caps, their_caps in itertools.product(CAP_SETS, repeat=2):
                path = choose_path(mine, my_pin, theirs, their_pin, my_caps, their_caps)
                assert path in ("esp", "udp", "punch", "tcp443", "relay")
                assert path == choose_path(theirs, their_pin, mine, my_pin, their_caps, my_caps)
                without = choose_path(mine, my_pin, theirs, their_pin)
                # offloads change one thing only: raw ESP becomes udp, when both ends offload and no one pins esp
                if path != without:
                    assert (without, path) == ("esp", "udp")
                    assert GSO in my_caps and GSO in their_caps and "esp" not in (my_pin, their_pin)


@pytest.mark.parametrize("pair", [("public", "public"), ("public", "nat"), ("nat", "nat")])
def test_offloading_agents_take_udp_where_they_would_take_raw_esp(pair: tuple[str, str]) -> None:
    mine, theirs = pair
    assert choose_path(mine, None, theirs, None, CAPS, CAPS) == "udp"
    assert choose_path(mine, None, theirs, None, (GSO,), (GSO,)) == "udp"
    assert choose_path(mine, None, theirs, None, CAPS, (CSUM,)) == "esp"  # one end without GSO: raw ESP costs nothing
    assert choose_path(mine, None, theirs, None, CAPS, ()) == "esp"  # an old agent reports nothing
    assert choose_path(mine, "esp", theirs, None, CAPS, CAPS) == "esp"  # the operator's pin wins
    assert choose_path(mine, None, theirs, "esp", CAPS, CAPS) == "esp"
    assert choose_path(mine, "relay", theirs, None, CAPS, CAPS) == "relay"


def test_pins_win() -> None:
    assert choose_path("public", "relay", "public", None) == "relay"
    assert choose_path("public", "tcp443", "public", None) == "tcp443"
    assert choose_path("pat", "tcp443", "pat", None) == "relay"  # nobody to dial: the relay carries it
    assert choose_path("public", "udp", "public", None) == "udp"
