"""``serve`` checks its ports before it starts anything and names the key when one cannot be opened."""

from __future__ import annotations

import socket

import pytest

from dicom_node.config import config_from_mapping
from dicom_node.ops.service import ListenError, check_listen_ports


def config(node_port: int, web_port: int, address: str = "127.0.0.1"):
    return config_from_mapping({"node": {"port": node_port, "bind_address": address},
                                "web": {"port": web_port, "bind_address": address}}, environ={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("key", ["node.port", "web.port"])
def test_a_port_in_use_names_its_key(key: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"node.port": free_port(), "web.port": free_port(), key: busy}
        with pytest.raises(ListenError) as raised:
            check_listen_ports(config(ports["node.port"], ports["web.port"]), frozenset({"receive", "web"}))
    assert str(raised.value) == f"{key} {busy} is already in use on 127.0.0.1 (errno 98)"


def test_only_the_ports_of_the_process_roles_are_checked() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # A worker serves no DICOM port, and only warns when it cannot serve /metrics on web.port.
        check_listen_ports(config(busy, free_port()), frozenset({"worker", "export"}))
        check_listen_ports(config(free_port(), busy), frozenset({"receive", "export"}))


def test_an_address_of_another_host_names_the_bind_address() -> None:
    with pytest.raises(ListenError, match=r"^node.bind_address '192.0.2.1' is not an address of this host"):
        check_listen_ports(config(free_port(), 0, address="192.0.2.1"), frozenset({"receive"}))
