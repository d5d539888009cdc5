"""RFC 9329 framing of ESP on a stream (RELIABILITY.md D17): any read split, any coalescing, bad lengths."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.tlsstream import (
    MAX_MESSAGE,
    NON_ESP_MARKER,
    PREFIX,
    RELAY,
    Framer,
    FramingError,
    InboundQueue,
    control,
    frame,
    is_esp,
    pack_named,
    parse_control,
    unpack_named,
)

esp_messages = st.binary(min_size=4, max_size=3000).filter(lambda m: m[:4] != NON_ESP_MARKER)
messages = st.lists(st.one_of(esp_messages, st.binary(max_size=200).map(lambda b: control(RELAY, b))), max_size=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return chunks


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0), max_size=60), st.booleans())
def test_any_split_or_coalescing_gives_back_the_messages(sent: list[bytes], cuts: list[int], prefixed: bool) -> None:
    stream = (PREFIX if prefixed else b"") + b"".join(frame(m) for m in sent)
    framer = Framer(expect_prefix=prefixed)
    received = []
    for chunk in split(stream, cuts):
        received += framer.feed(chunk)
    assert received == sent
    assert framer.buffered == 0


@settings(max_examples=100, deadline=None)
@given(messages, st.integers(min_value=1, max_value=7))
def test_byte_by_byte_and_a_partial_tail_stays_buffered(sent: list[bytes], tail: int) -> None:
    framer = Framer()
    stream = b"".join(frame(m) for m in sent) + frame(b"\x01\x02\x03\x04\x05\x06\x07\x08")[:tail]
    received = []
    for i in range(len(stream)):
        received += framer.feed(stream[i : i + 1])
    assert received == sent
    assert framer.buffered == tail


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5])
def test_lengths_too_small_for_an_spi_are_errors(length: int) -> None:
    with pytest.raises(FramingError):
        Framer().feed(struct.pack("!H", length) + b"\x00" * 8)


def test_oversize_length_is_an_error_before_the_body_arrives() -> None:
    framer = Framer(max_message=1500)
    assert framer.feed(frame(b"\x01" * 1500)) == [b"\x01" * 1500]
    with pytest.raises(FramingError):
        framer.feed(struct.pack("!H", 1500 + 2 + 1))  # only the header: refused at once, nothing buffered first


def test_largest_message_fits_and_larger_cannot_be_framed() -> None:
    big = b"\x01" * MAX_MESSAGE
    assert Framer().feed(frame(big)) == [big]
    with pytest.raises(ValueError):
        frame(big + b"\x01")
    with pytest.raises(ValueError):
        frame(b"\x01\x02\x03")


@pytest.mark.parametrize("start", [b"IKETCQ", b"GET / HTTP/1.1\r\n", b"\x00\x10"])
def test_a_stream_without_the_prefix_is_refused(start: bytes) -> None:
    framer = Framer(expect_prefix=True)
    with pytest.raises(FramingError):
        for i in range(len(start)):
            framer.feed(start[i : i + 1])


def test_prefix_split_across_reads() -> None:
    framer = Framer(expect_prefix=True)
    assert framer.feed(b"IKE") == []
    assert framer.feed(b"TCP" + frame(b"\x00\x00\x01\x00esp")[:3]) == []
    assert framer.feed(frame(b"\x00\x00\x01\x00esp")[3:]) == [b"\x00\x00\x01\x00esp"]


def test_control_messages_and_names() -> None:
    message = control(RELAY, pack_named("node-b", b"\x00\x00\x01\x00sealed"))
    assert not is_esp(message) and is_esp(b"\x00\x00\x01\x00")
    kind, body = parse_control(message)
    assert kind == RELAY
    assert unpack_named(body) == ("node-b", b"\x00\x00\x01\x00sealed")
    for bad in (b"", b"\x00", b"\x05ab", b"\x41" + b"a" * 65, b"\x02\xff\xfe"):
        with pytest.raises(FramingError):
            unpack_named(bad)
    with pytest.raises(ValueError):
        pack_named("", b"x")
    with pytest.raises(FramingError):
        parse_control(NON_ESP_MARKER)


def test_inbound_queue_is_bounded_and_stays_readable_while_it_holds_packets() -> None:
    import select

    queue = InboundQueue(limit=100)
    try:
        assert select.select([queue], [], [], 0)[0] == []
        assert all(queue.put((bytes([i]), 1)) for i in range(100))
        assert not queue.put((b"x", 1)) and queue.dropped == 1
        assert select.select([queue], [], [], 0)[0] == [queue]
        assert [p for p, _ in queue.pop(64)] == [bytes([i]) for i in range(64)]
        assert select.select([queue], [], [], 0)[0] == [queue], "36 left: must stay readable"
        assert len(queue.pop(64)) == 36
        assert select.select([queue], [], [], 0)[0] == []
    finally:
        queue.close()


def test_relay_configuration_defaults_round_trip_and_bad_port(tmp_path: Path) -> None:
    from services.config import ConfigError, ServerConfig, load_config

    config = ServerConfig(directory=tmp_path, listen="*")
    assert (config.relay_port, config.relay_host) == (443, "0.0.0.0"), "default: port 443 where the broker listens"
    assert config.relay_cert_path == tmp_path / "keys" / "relay-tls.crt"
    custom = ServerConfig(directory=tmp_path, relay_listen="192.0.2.1", relay_port=8443, relay_cert="/etc/c.pem")
    (tmp_path / "config.toml").write_text(custom.to_toml())
    loaded = load_config(tmp_path)
    assert loaded == custom and loaded.relay_host == "192.0.2.1"
    (tmp_path / "config.toml").write_text("[relay]\nport = 0\n")
    with pytest.raises(ConfigError, match=r"relay\.port"):
        load_config(tmp_path)


def test_self_signed_certificate_is_made_once(tmp_path: Path) -> None:
    import ssl
    import stat

    from nodeagent.tlsstream import ensure_certificate, server_context

    cert, key = tmp_path / "keys" / "relay-tls.crt", tmp_path / "keys" / "relay-tls.key"
    ensure_certificate(cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = cert.read_bytes()
    ensure_certificate(cert, key)
    assert cert.read_bytes() == first, "an existing certificate is kept"
    assert isinstance(server_context(cert, key), ssl.SSLContext)
