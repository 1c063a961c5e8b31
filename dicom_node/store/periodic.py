"""A background thread that runs one housekeeping action at start and then at a fixed interval."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

LOGGER = logging.getLogger(__name__)


class PeriodicTask(threading.Thread):
    """Run ``action`` now and then every ``interval`` seconds until ``stop`` is set.

    An exception is logged and the action is tried again at the next interval (the database may be briefly
    unavailable); it never ends the thread.
    """

    def __init__(self, name: str, action: Callable[[], object], stop: threading.Event, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.action = action
        self.stop_event = stop
        self.interval = interval

    def run(self) -> None:
        while True:
            try:
                self.action()
            except Exception:
                LOGGER.exception("%s failed; trying again in %.0f s", self.name, self.interval)
            if self.stop_event.wait(self.interval):
                return
