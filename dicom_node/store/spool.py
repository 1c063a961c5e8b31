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
from pathlib import Path
from typing import Iterable, Iterator

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
        pending = self.begin_write(relative, chunks)
        pending.commit()
        return pending.size

    def begin_write(self, relative: str, chunks: Iterable[bytes | memoryview]) -> PendingWrite:
        """Write ``chunks`` to a temporary file and return it, not yet durable nor in place.

        The caller finishes with :meth:`PendingWrite.commit` (possibly in another thread, so the fsync overlaps
        other work) or :meth:`PendingWrite.discard`. On error nothing is left behind and the error propagates.
        """
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        size = 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        return PendingWrite(fd, temp, self.absolute(relative), size)

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
    """A spool file written to ``.incoming`` whose fsync and rename into place are still to come.

    :meth:`commit` does it all in the safe order (fsync, rename, fsync of the directory). The C-STORE handler
    uses the parts instead: :meth:`place` first, then :meth:`sync` in a helper thread while it records the row,
    and answers only after both. A crash of the process in between leaves a whole file in place (the kernel has
    its data) that was never acknowledged; the start-up re-index checks such files before recording them.
    """

    def __init__(self, fd: int, temp: Path, target: Path, size: int) -> None:
        self.fd: int | None = fd
        self.temp = temp
        self.target = target
        self.size = size
        self._new_dir = False

    def commit(self) -> None:
        """fsync the file, rename it into place and fsync the directories whose entries changed."""
        try:
            os.fsync(self._fd())
        except BaseException:
            self.discard()
            raise
        self.place()
        self.sync()

    def place(self) -> None:
        """Rename the file into place (atomically replacing an earlier copy). On error nothing stays behind."""
        try:
            self._new_dir = not self.target.parent.is_dir()
            if self._new_dir:
                self.target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.temp, self.target)
        except BaseException:
            self.discard()
            raise

    def sync(self) -> None:
        """fsync the file (if not done yet), close it, and fsync the directories whose entries changed."""
        try:
            if self.fd is not None:
                os.fsync(self.fd)
        finally:
            self._close()
        _fsync_dir(self.target.parent)
        if self._new_dir:
            _fsync_dir(self.target.parent.parent)
            _fsync_dir(self.target.parent.parent.parent)

    def discard(self) -> None:
        """Close and remove the temporary file (the target is not touched)."""
        self._close()
        self.temp.unlink(missing_ok=True)

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError("the pending write is already closed")
        return self.fd

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
