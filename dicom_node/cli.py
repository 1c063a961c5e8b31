"""The ``dicom-node`` command line.

Each group of commands lives beside the code it drives and adds itself here through a ``register(subparsers)``
function, so this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from dicom_node import __version__
from dicom_node.config import Config, ConfigError, load_config

LOGGER = logging.getLogger(__name__)

#: Modules that contribute commands; each has ``register(subparsers) -> None``.
COMMAND_MODULES = (
    "dicom_node.commands",
    "dicom_node.ops_commands",
    "dicom_node.denoise.cli",
    "training.cli",
)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--config FILE`` option (default: ``$DICOM_NODE_CONFIG`` or built-in defaults)."""
    parser.add_argument(
        "--config", "-c", metavar="FILE", default=None,
        help="configuration file (default: $DICOM_NODE_CONFIG, else built-in defaults)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the configuration named by ``--config`` or ``$DICOM_NODE_CONFIG``."""
    import os

    path = getattr(args, "config", None) or os.environ.get("DICOM_NODE_CONFIG") or None
    return load_config(path)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps; one line per event, never patient names or IDs."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its association-level messages only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every registered command group."""
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="A DICOM node that denoises series on their way from scanners to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
