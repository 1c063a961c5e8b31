"""Admission of TCP connections to the SCP before they associate (dicom_node.dimse.reactor.ConnectionGate)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from dicom_node.dimse.reactor import ConnectionGate


def gate(hosts: list[str], cap: int = 2) -> ConnectionGate:
    return ConnectionGate([ipaddress.ip_network(h, strict=False) for h in hosts], cap, 5.0)


def test_hosts_outside_the_allow_list_are_refused() -> None:
    g = gate(["10.1.0.0/16", "127.0.0.1", "fd00::/8"])
    assert g.admit("10.1.2.3", 1000) is not None
    assert g.admit("127.0.0.1", 1000) is not None
    assert g.admit("::ffff:10.1.9.9", 1000) is not None  # IPv4-mapped on a dual-stack socket
    assert g.admit("fd00::1", 1000) is not None
    assert g.admit("10.2.0.1", 1000) is None
    assert g.admit("127.0.0.2", 1000) is None
    assert g.admit("not an address", 1000) is None


def test_an_empty_allow_list_admits_any_host() -> None:
    assert gate([]).admit("192.0.2.7", 1) is not None


def test_each_host_has_its_own_cap_and_a_place_comes_back_once() -> None:
    g = gate([], cap=2)
    first, second = g.admit("192.0.2.1", 1), g.admit("192.0.2.1", 2)
    assert first is not None and second is not None
    assert g.admit("192.0.2.1", 3) is None  # over the cap
    assert g.admit("192.0.2.2", 1) is not None  # another host is not affected
    first.settle()
    first.settle()  # idempotent: the association settles when established and again when it ends
    assert g.pending("192.0.2.1") == 1
    assert g.admit("192.0.2.1", 4) is not None
    assert g.admit("192.0.2.1", 5) is None


def test_refusals_are_logged_once_a_minute_per_host_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    g = gate(["10.0.0.0/8"])
    with caplog.at_level(logging.WARNING, logger="dicom_node.dimse.reactor"):
        for port in range(100):
            g.admit("192.0.2.1", port)
        g.admit("192.0.2.2", 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0] == "closed connection from 192.0.2.1:0 before association: host not in security.allowed_hosts"
    assert "192.0.2.2:1" in lines[1]
