"""The trust check's verdict in the derived files' DerivationDescription.

The check needs the whole series, so the files are written first with a fixed-width placeholder at the end of
DerivationDescription (:data:`PENDING_NOTE`), and :func:`write_trust_note` overwrites those bytes in place with the
verdict, padded to the same width: the element's length, and every other byte of the file, stay as written, so
nothing is re-encoded. It runs before the series is exported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

LOGGER = logging.getLogger(__name__)

#: Width of the verdict text in characters (ASCII, so bytes in every character set the node writes). The text is
#: right-aligned after a fixed prefix: a writer may strip trailing spaces from a text value, never inner ones.
VERDICT_WIDTH = 20
PREFIX = "; trust check: "
NOTE_WIDTH = len(PREFIX) + VERDICT_WIDTH
PENDING_NOTE = PREFIX + "pending".rjust(VERDICT_WIDTH)
#: The placeholder sits in the header (group 0008), well inside the first bytes of the file.
HEADER_BYTES = 4 * 1024 * 1024


def trust_note(verdict: str | None, score: float | None = None) -> str:
    """The note for a verdict (``pass``, ``warn``, ``fail``; ``None`` when the check could not run)."""
    text = "not run" if verdict is None else verdict
    if verdict is not None and score is not None:
        text += f" (score {score:.2f})"
    if len(text) > VERDICT_WIDTH:
        raise ValueError(f"trust verdict {text!r} is longer than {VERDICT_WIDTH} characters")
    return PREFIX + text.rjust(VERDICT_WIDTH)


def write_trust_note(paths: Iterable[Path], note: str, durable: bool = True) -> int:
    """Overwrite the pending note in each derived file with ``note`` (from :func:`trust_note`).

    Returns the number of files changed. A file without the placeholder (written before the note existed, or
    with the check off) is left as it is and logged.
    """
    old, new = PENDING_NOTE.encode("ascii"), note.encode("ascii")
    if len(new) != len(old):
        raise ValueError("the note must have the placeholder's width")
    changed = 0
    for path in paths:
        with open(path, "r+b") as fh:
            head = fh.read(HEADER_BYTES)
            offsets = []
            start = head.find(old)
            while start >= 0:
                offsets.append(start)
                start = head.find(old, start + len(old))
            if not offsets:
                LOGGER.warning("%s: no pending trust note in DerivationDescription; left as written", path)
                continue
            for offset in offsets:  # the top level and, in enhanced objects, DerivationImageSequence
                fh.seek(offset)
                fh.write(new)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        changed += 1
    return changed
