"""Exceptions of the denoising stage."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger(__name__)


class SeriesRefused(Exception):
    """A series (or one of its instances) cannot be denoised; ``reason`` says why in words a user can act on.

    Raised for colour images, unsupported photometric interpretations or pixel formats, files that fail to
    decode (for example the non-conformant 12-bit JPEG Extended streams of the WG04 set), inconsistent series
    and models whose card does not fit the series. Never raised for bugs: those stay ordinary exceptions.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)
