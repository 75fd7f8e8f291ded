"""Broker addresses as engineers type them (edge-web --broker, edge-sync pull --mqtt)."""

from __future__ import annotations

import pytest

from edge_agent.address import parse_host_port


@pytest.mark.parametrize("text, expected", [
    ("broker.site.local:8883", ("broker.site.local", 8883)),
    ("10.0.0.5", ("10.0.0.5", 1883)),
    ("[::1]:1884", ("::1", 1884)),
    ("[fe80::1]", ("fe80::1", 1883)),
    (" localhost:1883 ", ("localhost", 1883)),
])
def test_host_and_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text, message", [
    ("broker:0", "port 0 is not between 1 and 65535"),
    ("broker:70000", "port 70000 is not between 1 and 65535"),
    (":1883", "expected HOST:PORT"),
    ("broker:port", "expected HOST:PORT"),
    ("::1:1883", "expected HOST:PORT"),  # a bare v6 address is ambiguous: brackets are required
    ("mqtt://broker:1883", "expected HOST:PORT"),
])
def test_bad_addresses_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_host_port(text)
