"""The ``dicom-node`` command line.

Each group of commands is a module of this package (``commands``: serve, config, echo, status, jobs, rules;
``ops_commands``: db, web, audit, health; ``denoise``: denoise and models) or ``training.cli``, and adds itself
here through a ``register(subparsers)`` function; this module holds what they share and wires them together.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from sqlalchemy import Engine

from dicom_node import __version__
from dicom_node.config import Config, ConfigError, load_config
from dicom_node.store.database import make_engine, schema_version

LOGGER = logging.getLogger(__name__)

#: Modules that contribute commands; each has ``register(subparsers) -> None``.
COMMAND_MODULES = (
    "dicom_node.cli.commands",
    "dicom_node.cli.ops_commands",
    "dicom_node.cli.denoise",
    "training.cli",
)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add the common ``--config FILE`` option (default: ``$DICOM_NODE_CONFIG`` or built-in defaults)."""
    parser.add_argument(
        "--config", "-c", metavar="FILE", default=None,
        help="configuration file (default: $DICOM_NODE_CONFIG, else built-in defaults)",
    )


class CommandError(Exception):
    """Ends a command: :func:`main` prints ``dicom-node: MESSAGE`` on stderr and exits with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def config_from_args(args: argparse.Namespace, *, check_models: bool = False) -> Config:
    """Load the configuration named by ``--config`` or ``$DICOM_NODE_CONFIG``.

    ``check_models`` also checks the rules against the installed models (see :func:`load_config`).
    """
    path = getattr(args, "config", None) or os.environ.get("DICOM_NODE_CONFIG") or None
    return load_config(path, check_models=check_models)


@contextlib.contextmanager
def existing_database(cfg: Config) -> Iterator[Engine]:
    """The engine of the node's existing job table, disposed of when the block ends.

    Commands that read or change the queue use it; they never create a database (``db upgrade`` does).

    Raises
    ------
    CommandError
        Status 1, saying why there is none: no data directory, or no schema (the node has not run yet).
    """
    if not cfg.node.database_url and not cfg.data_path.is_dir():
        raise CommandError(f"data directory {cfg.data_path} does not exist (has the node run yet?)")
    engine = make_engine(cfg.database_url)
    try:
        if schema_version(engine) is None:
            raise CommandError(f"no database at {cfg.database_url} (has the node run yet?)")
        yield engine
    finally:
        engine.dispose()


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
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_repeated_connect_errors)


#: pynetdicom's own ERROR lines for a destination that cannot be reached; the exporter and ``echo`` already log
#: one line with the destination and the reason, so these only doubled every retry.
_PYNETDICOM_CONNECT_ERRORS = ("Association request failed: unable to connect to remote",
                              "TCP Initialisation Error")


def _drop_repeated_connect_errors(record: logging.LogRecord) -> bool:
    if not record.name.startswith("pynetdicom"):
        return True
    message = record.getMessage()
    return not message.startswith(_PYNETDICOM_CONNECT_ERRORS)


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
        status = int(handler(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
        return status
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dicom-node audit --json | head`): stop quietly, as other command-line tools do.
        # What is still buffered for stdout would fail again when Python flushes it at exit, so send it nowhere.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # stdout is not a real file (tests capture it)
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
