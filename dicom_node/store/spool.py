"""The spool: received files, kept exactly as they came, under ``spool/<study>/<series>/<sop>.dcm``.

A file is written to ``spool/.incoming/``, fsynced, renamed into place and its directory fsynced, so a file in
its final place is always whole. Leftovers in ``.incoming`` were never acknowledged and are removed at start-up.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from dicom_node.store.fsync import fsync_path

LOGGER = logging.getLogger(__name__)

#: PS3.5 9.1: components of digits, no leading zero unless the component is "0", at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

INCOMING_DIR = ".incoming"


def is_valid_uid(value: object) -> bool:
    """Return whether ``value`` is a valid DICOM UID (PS3.5 9.1), and so safe as a file name."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


class Spool:
    """The folder of received instances.

    Parameters
    ----------
    root : Path
        The spool folder (``<data_dir>/spool``); created when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Return the instance's path relative to the data directory's parent of the spool.

        Raises
        ------
        ValueError
            If any UID is not a valid UID (it would otherwise become a path).
        """
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"{name} {uid!r} is not a valid UID")
        return f"spool/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """Absolute path of a path relative to the data directory (as stored in the job table)."""
        return self.root.parent / relative

    def write(self, relative: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` durably to ``relative`` (under the data directory) and return the size in bytes.

        The target is replaced atomically if it exists (a re-sent instance). On any error nothing is left behind
        and the error propagates.
        """
        pending = self.begin_write(chunks)
        pending.place(self.absolute(relative))
        pending.sync_directories()
        return pending.size

    def begin_write(self, chunks: Iterable[bytes | memoryview]) -> PendingWrite:
        """Write ``chunks`` to a new file in ``.incoming``, fsync and close it; return it, not yet in place.

        The caller finishes with :meth:`PendingWrite.place` and :meth:`PendingWrite.sync_directories`, or
        :meth:`PendingWrite.discard`. The C-STORE handler runs this in a helper thread while it checks and parses
        the dataset. On error nothing is left behind and the error propagates.
        """
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        size = 0
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                        size += written
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return PendingWrite(temp, size)

    def remove_incoming_leftovers(self) -> int:
        """Delete partial files of writes a crash interrupted; return how many there were."""
        count = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            count += 1
        if count:
            LOGGER.warning("removed %d partial file(s) of unacknowledged instances from %s", count, self.incoming)
        return count

    def iter_files(self) -> Iterator[Path]:
        """Yield every stored instance file (``<study>/<series>/<sop>.dcm``)."""
        for study in self.root.iterdir():
            if study.name == INCOMING_DIR or not study.is_dir():
                continue
            for series in study.iterdir():
                if series.is_dir():
                    yield from series.glob("*.dcm")

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem, for an unprivileged writer."""
        return shutil.disk_usage(self.root).free


class PendingWrite:
    """A whole, fsynced spool file in ``.incoming``, to be renamed into place and its directory fsynced.

    A file in its final place is therefore always whole, even after a power loss; only its directory entry may
    be lost until :meth:`sync_directories` returns.
    """

    def __init__(self, temp: Path, size: int) -> None:
        self.temp = temp
        self.size = size
        self.target: Path | None = None
        self._new_dirs: list[Path] = []

    def place(self, target: Path) -> None:
        """Rename the file to ``target`` (atomically replacing an earlier copy). On error it is removed."""
        try:
            missing = [d for d in (target.parent.parent, target.parent) if not d.is_dir()]
            if missing:
                target.parent.mkdir(parents=True, exist_ok=True)
                # the parents of the new folders get new entries: fsync them too
                self._new_dirs = [d.parent for d in missing]
            os.replace(self.temp, target)
            self.target = target
        except BaseException:
            self.discard()
            raise

    def sync_directories(self) -> None:
        """fsync the directories whose entries :meth:`place` changed, so the rename survives a power loss."""
        if self.target is None:
            raise ValueError("the file is not in place yet")
        for directory in [self.target.parent, *self._new_dirs]:
            fsync_path(directory)

    def discard(self) -> None:
        """Remove the temporary file (a placed target is not touched)."""
        self.temp.unlink(missing_ok=True)
