"""tests/ports.py: ports for test servers, outside the range Ray's processes bind from."""

from __future__ import annotations

import socket

from tests.ports import _ephemeral_low, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    low = _ephemeral_low()
    for port in ports:
        assert 20000 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when handed out (nothing here holds it)


def test_a_port_bound_to_zero_never_collides_with_one_handed_out():
    """What Ray's processes do (bind to port 0) cannot land on a port these hand out."""
    handed = {free_port() for _ in range(20)}
    low = _ephemeral_low()
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        assert port >= low and port not in handed
