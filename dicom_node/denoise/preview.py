"""Before / after / difference preview images, written as 8-bit greyscale PNG with zlib only (no Pillow)."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from dicom_node.denoise.pixels import PixelFormat, stored_to_physical

LOGGER = logging.getLogger(__name__)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a 2-D uint8 array as a greyscale PNG (PNG spec: IHDR, one IDAT, IEND; filter type 0)."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    h, w = arr.shape
    raw = b"".join(b"\x00" + arr[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    out = Path(path)
    out.write_bytes(png)
    return out


#: (low, high) HU of the soft-tissue window W400/L40.
SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def preview_image(before: np.ndarray, after: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Side-by-side before | after | difference, 8-bit.

    Before and after share one window: for images in HU the soft-tissue window (W400/L40, -160..240 HU), where
    noise and low-contrast edges are what a reader judges (a percentile window spans air to bone and hides both);
    otherwise the 1st-99th percentile of the source. The difference is centred on grey with +-3 standard
    deviations of the difference as full scale. MONOCHROME1 images are shown inverted, as viewers do.
    """
    b = stored_to_physical(before, fmt)
    a = stored_to_physical(after, fmt)
    if (fmt.rescale_type or "").upper() == "HU":
        lo, hi = SOFT_TISSUE_WINDOW_HU
    else:
        lo, hi = np.percentile(b, [1, 99])
    left, middle = _window(b, lo, hi), _window(a, lo, hi)
    if fmt.photometric == "MONOCHROME1":
        left, middle = 255 - left, 255 - middle
    diff = a - b
    sd = float(diff.std()) or 1.0
    right = _window(diff, -3 * sd, 3 * sd)
    gap = np.full((before.shape[0], 4), 255, dtype=np.uint8)
    return np.concatenate([left, gap, middle, gap, right], axis=1)
