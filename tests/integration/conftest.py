"""Fixtures that start the real node and real peers as subprocesses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import require_program
from tests.peers import Peer, dicom_node

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
def _peer_programs() -> None:
    for program in ("storescu", "echoscu"):
        require_program(program)


NodeFactory = Callable[..., contextlib.AbstractContextManager[Peer]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one small CT model, ``tiny-ct`` (not the identity: derived pixels differ from the source)."""
    from tests.fixtures.images import make_tiny_model

    folder = tmp_path_factory.mktemp("models")
    make_tiny_model(folder, name="tiny-ct", identity=False, seed=3)
    return folder


@pytest.fixture()
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start ``dicom-node serve`` subprocesses: ``with node_factory(extra_env={...}) as node: ...``."""
    stack = contextlib.ExitStack()

    def start(data_dir: Path | None = None, config: Path | None = None,
              **kwargs) -> contextlib.AbstractContextManager[Peer]:
        return dicom_node(data_dir or tmp_path / "node", config=config, **kwargs)

    with stack:
        yield start
