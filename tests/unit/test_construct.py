"""bus.messages.construct: the fanout's fast model_construct must build exactly what model_construct builds."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from bus import codec
from bus.messages import construct
from bus.messages.sync import NodeView, PeerView, Seal, Update, ViewDelta


def test_it_equals_model_construct_with_and_without_defaults() -> None:
    peer = PeerView(name="p", vips={"v": "10.0.0.2"}, roles={"v": "member"})
    cases = [
        (ViewDelta, {"set_peers": {"p": peer}}),
        (ViewDelta, {}),
        (NodeView, {"node": "n", "peers": {"p": peer}}),
        (Seal, {"expires": 5, "signature": "ab", "proof": ["cd"]}),
        (Seal, {"expires": 5, "signature": "ab"}),
    ]
    for cls, values in cases:
        fast, slow = construct(cls, **dict(values)), cls.model_construct(**dict(values))
        assert fast == slow
        assert fast.model_dump() == slow.model_dump()
        assert fast.model_fields_set == slow.model_fields_set


def test_defaults_from_factories_are_fresh_per_instance() -> None:
    a, b = construct(ViewDelta), construct(ViewDelta)
    assert a.set_peers == {} and a.set_peers is not b.set_peers
    assert a.del_peers is not b.del_peers


def test_a_constructed_update_encodes_and_decodes_to_an_equal_message() -> None:
    seal = construct(Seal, expires=9, signature="00" * 64, proof=["11" * 32])
    update = construct(Update, revision=3, prev_revision=2, delta=construct(ViewDelta, acl=[]), digest="d", seal=seal)
    assert codec.decode(codec.encode(update)) == update


def test_models_with_aliases_are_refused() -> None:
    class Aliased(BaseModel):
        value: int = Field(alias="v")

    with pytest.raises(TypeError, match="model_construct"):
        construct(Aliased, value=1)
