"""The server's UDP reflector on loopback: what each port answers (NAT discovery, natprobe.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from nodeagent.natprobe import DEPENDENT, INDEPENDENT, NatProbe, answer, parse_answer, probe
from services.fanout.reflector import Reflector


@pytest.fixture
def reflector() -> Iterator[Reflector]:
    for port in range(47000, 47400, 7):  # three consecutive free ports
        try:
            found = Reflector("127.0.0.1", port)
        except OSError:
            continue
        found.start()
        yield found
        found.stop()
        return
    pytest.skip("no three consecutive free UDP ports on loopback")


def answers(sock: socket.socket, count: int) -> list[tuple[int, str, int]]:
    got = []
    for _ in range(count):
        data, (_, from_port) = sock.recvfrom(64)
        parsed = parse_answer(data)
        assert parsed is not None
        got.append((parsed[1], parsed[2], from_port))
    return sorted(got)


def test_each_port_answers_as_documented_and_a_probe_reaches_a_conclusion(reflector: Reflector) -> None:
    port = reflector.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3.0)
        seen = f"127.0.0.1:{sock.getsockname()[1]}"
        natprobe = NatProbe()
        datagram = natprobe.start(0.0)
        sock.sendto(datagram, ("127.0.0.1", port))
        first = answers(sock, 2)
        assert first == [(0, seen, port), (1, seen, port + 1)]
        sock.sendto(datagram, ("127.0.0.1", port + 2))
        second = answers(sock, 1)
        assert second == [(2, seen, port + 2)]
        sock.sendto(probe(b"12345678"), ("127.0.0.1", port + 1))  # the filtering port is never probed
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recvfrom(64)

        nonce = datagram[8:16]
        for kind, address, _ in first + second:  # what the data plane would hand the probe
            host, _, number = address.rpartition(":")
            assert natprobe.on_answer(answer(nonce, kind, (host, int(number))))
        assert natprobe.conclude(10.0)
        assert natprobe.report.mapping == INDEPENDENT and natprobe.report.filtering == "open"


def test_a_different_mapping_at_the_third_port_is_called_dependent() -> None:
    natprobe = NatProbe()
    nonce = natprobe.start(0.0)[8:16]
    assert natprobe.on_answer(answer(nonce, 0, ("198.51.100.7", 40001)))
    assert natprobe.on_answer(answer(nonce, 2, ("198.51.100.7", 52817)))
    assert natprobe.conclude(10.0)
    assert natprobe.report.mapping == DEPENDENT and natprobe.report.filtering == "restricted"
