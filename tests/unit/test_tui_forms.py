"""The TUI's forms and filters as pure functions: what the operator types becomes the CLI's request, or a reason.

Why: the TUI must send exactly the operator requests the CLI sends, and say
what is wrong inline, with the server's own words, before anything is sent.
"""

from __future__ import annotations

import pytest

from bus.messages.datastore import AclAdd, MemberAdd, MemberRemove, NodeAdd, RouteAdd, VpnCreate
from tests.tui.fixed_state import EVENTS, FIXED
from tui.app import forms
from tui.app.forms import FormError
from tui.app.widgets.event_log import matches, receipt


def test_vpn_create_builds_the_cli_request() -> None:
    message = forms.build_vpn_create(
        {"name": "office", "subnet": " 10.1.0.0/24 ", "addressing": "native", "topology": "hub-spoke"}
    )
    assert isinstance(message, VpnCreate)
    assert (message.name, message.subnet, message.addressing, message.topology) == (
        "office",
        "10.1.0.0/24",
        "native",
        "hub-spoke",
    )
    assert message.idempotency_key and not message.dry_run


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"name": "", "subnet": "10.1.0.0/24"}, "name", "required"),
        ({"name": "any", "subnet": "10.1.0.0/24"}, "name", "reserved"),
        ({"name": "bad name", "subnet": "10.1.0.0/24"}, "name", "invalid"),
        ({"name": "office", "subnet": "10.1.0.1/24"}, "subnet", "invalid"),
        ({"name": "office", "subnet": "10.1.0.0/31"}, "subnet", "too small"),
    ],
)
def test_vpn_create_says_which_field_is_wrong(values: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(FormError) as caught:
        forms.build_vpn_create(values | {"addressing": "overlay", "topology": "mesh"})
    assert caught.value.field == field
    assert words in caught.value.message


def test_node_add_splits_vpns_and_tags() -> None:
    message = forms.build_node_add({"name": "alpha", "vpns": "office, lab", "tags": "staff dev"})
    assert isinstance(message, NodeAdd)
    assert (message.vpns, message.tags) == (["office", "lab"], ["staff", "dev"])
    with pytest.raises(FormError) as caught:
        forms.build_node_add({"name": "alpha", "vpns": "tag:x", "tags": ""})
    assert caught.value.field == "vpns"


def test_member_and_route_requests() -> None:
    add = forms.build_member({"node": "alpha", "vpn": "office", "role": "gateway"})
    assert isinstance(add, MemberAdd) and add.role == "gateway"
    assert isinstance(forms.MEMBER_REMOVE.build({"node": "alpha", "vpn": "office"}), MemberRemove)
    route = forms.build_route({"node": "gw", "vpn": "office", "cidr": "192.168.1.0/24"})
    assert isinstance(route, RouteAdd) and route.cidr == "192.168.1.0/24"
    with pytest.raises(FormError) as caught:
        forms.build_route({"node": "gw", "vpn": "office", "cidr": "192.168.1.1/24"})
    assert caught.value.field == "cidr" and "CIDR" in caught.value.message


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"src": "tag:", "dst": "any", "proto": "any", "ports": ""}, "src"),
        ({"src": "any", "dst": "", "proto": "any", "ports": ""}, "dst"),
        ({"src": "any", "dst": "any", "proto": "tcp", "ports": "22,99999"}, "ports"),
        ({"src": "any", "dst": "any", "proto": "icmp", "ports": "22"}, "ports"),
    ],
)
def test_acl_rule_validation_is_inline(values: dict[str, str], field: str) -> None:
    with pytest.raises(FormError) as caught:
        forms.build_rule({"vpn": "office"} | values)
    assert caught.value.field == field


def test_acl_rule_request() -> None:
    message = forms.build_rule({"vpn": "office", "src": "tag:staff", "dst": "gw", "proto": "tcp", "ports": "22, 443"})
    assert isinstance(message, AclAdd)
    assert (message.src, message.dst, message.proto, message.ports) == ("tag:staff", "gw", "tcp", "22, 443")


def test_event_filter_and_receipts() -> None:
    shown = [e.revision for e in EVENTS if matches(e, "FANOUT offline")]
    assert shown == [6]
    assert [e.revision for e in EVENTS if matches(e, "")] == [e.revision for e in EVENTS]
    assert receipt(EVENTS[4]) == "2/3 (1 pending)" and receipt(EVENTS[0]) == "-"


def test_state_peers_and_events_of_a_node() -> None:
    peers = {(vpn, m.node) for vpn, m in FIXED.peers_of("gw-berlin")}
    assert peers == {("office", "laptop-ann"), ("office", "laptop-bob"), ("lab", "build-01")}
    assert FIXED.peers_of("nobody") == []
    assert [e.revision for e in FIXED.events_about("laptop-bob")] == [6]
