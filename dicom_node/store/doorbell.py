"""Waking a stage as soon as work is queued for it, instead of at its next poll.

In one process (``dicom-node serve``) the assembler rings the worker's bell when it queues a job, and the worker
rings the exporters' bell when it queues exports, so a series moves on within milliseconds. Polling stays as the
fallback: work queued by another process (a scaled-out site, ``dicom-node jobs retry``) or a retry that falls due
is still found at the next poll.
"""

from __future__ import annotations

import threading


class Doorbell:
    """A ring counter that waiting threads can sleep on.

    A waiter reads :attr:`rings` *before* looking for work and passes it to :meth:`wait`; a ring that came in
    between (work queued while it was looking) then ends the wait at once instead of being missed.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._rings = 0

    @property
    def rings(self) -> int:
        """How many times the bell has rung so far."""
        with self._condition:
            return self._rings

    def ring(self) -> None:
        """Wake every thread waiting on this bell."""
        with self._condition:
            self._rings += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        """Sleep until the bell rings after ``seen`` rings, or ``timeout`` seconds; return whether it rang."""
        with self._condition:
            return self._condition.wait_for(lambda: self._rings != seen, timeout)
