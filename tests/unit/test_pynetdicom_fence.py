"""The fence around pynetdicom's internals: the originals that ``dimse/reactor.py`` copies or overrides are the ones
it was checked against, and the patched association is installed only where ``Node.start`` installs it."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pynetdicom.ae
import pytest

from dicom_node.dimse import reactor
from dicom_node.dimse.reactor import (
    UPSTREAM_PYNETDICOM_VERSION,
    UPSTREAM_SOURCE_SHA256,
    EventDrivenAssociation,
    upstream_source_sha256,
    use_event_driven_requestors,
)

#: Functions outside the subclasses whose upstream body the fast path relies on.
RELIED_ON = {"pynetdicom.ae.ApplicationEntity.associate"}


def _overridden_pynetdicom_methods() -> set[str]:
    """``module.Class.method`` of every pynetdicom method a class in ``reactor`` overrides."""
    found = set()
    for _name, cls in inspect.getmembers(reactor, inspect.isclass):
        if cls.__module__ != reactor.__name__:
            continue
        for attribute, value in vars(cls).items():
            if not callable(value):
                continue
            for base in cls.__mro__[1:]:
                if attribute in vars(base):
                    if base.__module__.startswith("pynetdicom"):
                        found.add(f"{base.__module__}.{base.__qualname__}.{attribute}")
                    break
    return found


def test_the_installed_pynetdicom_is_the_version_the_hashes_were_taken_from() -> None:
    assert version("pynetdicom") == UPSTREAM_PYNETDICOM_VERSION, (
        f"pynetdicom {version('pynetdicom')} is installed; dimse/reactor.py was checked against "
        f"{UPSTREAM_PYNETDICOM_VERSION}: see the README, 'Moving to a new pynetdicom release'")


def test_every_overridden_pynetdicom_method_has_a_recorded_hash() -> None:
    assert _overridden_pynetdicom_methods() | RELIED_ON == set(UPSTREAM_SOURCE_SHA256), (
        "UPSTREAM_SOURCE_SHA256 in dicom_node/dimse/reactor.py must list exactly the pynetdicom methods the module "
        "overrides (and those in RELIED_ON); add the new one's hash from upstream_source_sha256()")


@pytest.mark.parametrize("qualified_name", sorted(UPSTREAM_SOURCE_SHA256))
def test_upstream_original_is_unchanged(qualified_name: str) -> None:
    installed = upstream_source_sha256(qualified_name)
    assert installed == UPSTREAM_SOURCE_SHA256[qualified_name], (
        f"{qualified_name} differs from the pynetdicom {UPSTREAM_PYNETDICOM_VERSION} source that "
        f"dicom_node/dimse/reactor.py copies or overrides. Read the upstream change (diff the two releases' "
        f"source of this method), port it into dimse/reactor.py, run the tests with and without "
        f"DICOM_NODE_NODE__DIMSE_FAST_PATH=false, then set its hash to {installed} in UPSTREAM_SOURCE_SHA256 "
        f"and UPSTREAM_PYNETDICOM_VERSION to the new release (README: 'Moving to a new pynetdicom release')")


def test_a_changed_original_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash is of the installed source: a method whose source differs gives another hash."""
    import pynetdicom.dul

    def run_reactor(self) -> None:  # a stand-in for an upstream change
        pass

    monkeypatch.setattr(pynetdicom.dul.DULServiceProvider, "run_reactor", run_reactor)
    name = "pynetdicom.dul.DULServiceProvider.run_reactor"
    assert upstream_source_sha256(name) != UPSTREAM_SOURCE_SHA256[name]


def test_sending_a_series_leaves_the_association_class_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``Node.start`` decides which association ``AE.associate`` builds; the export used to patch it on its
    first series, so a C-ECHO's association depended on whether something had been exported before."""
    from dicom_node.export.exporter import _configure_pynetdicom

    stock = pynetdicom.ae.Association
    monkeypatch.setattr(pynetdicom.ae, "Association", stock)
    _configure_pynetdicom()
    assert pynetdicom.ae.Association is stock


def test_installing_the_event_driven_requestors_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom.ae, "Association", pynetdicom.ae.Association)
    use_event_driven_requestors()
    use_event_driven_requestors()
    assert pynetdicom.ae.Association is EventDrivenAssociation


def test_the_setting_chooses_the_server(tmp_path) -> None:
    """``node.dimse_fast_path = false`` (here from the environment, as CI's second pass sets it) serves with
    pynetdicom's own server and associations."""
    from pynetdicom.transport import ThreadedAssociationServer

    from dicom_node.config import config_from_mapping
    from dicom_node.dimse.reactor import AllowListServer, EventDrivenServer
    from dicom_node.receive.receiver import start_scp
    from tests.peers import free_port

    for fast, expected in (("true", EventDrivenServer), ("false", AllowListServer)):
        raw = {"node": {"port": free_port(), "bind_address": "127.0.0.1", "data_dir": str(tmp_path)}}
        cfg = config_from_mapping(raw, environ={"DICOM_NODE_NODE__DIMSE_FAST_PATH": fast})
        assert cfg.node.dimse_fast_path is (fast == "true")
        ae, server = start_scp(cfg, receiver=None)  # type: ignore[arg-type]
        try:
            assert type(server) is expected
            if fast == "false":
                assert isinstance(server, ThreadedAssociationServer)
                assert server.RequestHandlerClass.__module__ == "pynetdicom.transport"  # stock associations
        finally:
            ae.shutdown()
