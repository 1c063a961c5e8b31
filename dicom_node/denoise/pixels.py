"""Stored pixel values, physical units and network inputs (numpy only; no torch, no file access).

The chain for one image (PS3.3 C.7.6.3 Image Pixel module, C.11.1 Modality LUT module)::

    stored --(RescaleSlope, RescaleIntercept)--> physical (HU for CT) --(card normalisation)--> network input

and back. The way back never rebuilds pixels from the network output alone: the network's residual is converted
to a change of stored values and added to the *original* stored values (``apply_residual``), so a zero residual,
or strength 0, gives back exactly the input pixels, and padding pixels are never touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicom_node.denoise.errors import SeriesRefused

LOGGER = logging.getLogger(__name__)

GREY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
#: What the engine works on: grey stored values, or colour decoded to RGB (samples interleaved, last axis).
SUPPORTED_PHOTOMETRIC = GREY_PHOTOMETRIC + ("RGB",)
#: Colour encodings of a source that decode to RGB (pydicom converts YBR to RGB; a palette is looked up).
COLOUR_SOURCES = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
#: A pixel of an RGB image counts as grey (B-mode) when its channels differ by at most this much (8-bit values):
#: lossy (JPEG) sources shift grey pixels' chroma by a few levels, Doppler colours differ by tens.
GREY_TOLERANCE = 8


@dataclass(frozen=True)
class PixelFormat:
    """How an image's stored values are encoded and what they mean.

    Attributes
    ----------
    bits_allocated, bits_stored, pixel_representation
        (0028,0100), (0028,0101), (0028,0103): 0 unsigned, 1 two's complement.
    photometric
        MONOCHROME1 (low values bright) or MONOCHROME2.
    slope, intercept
        Modality rescale (identity when the image has none).
    rescale_type
        (0028,1054), or ``"HU"`` for CT without it (or with a misspelling of it, see :func:`ct_rescale_unit`),
        or ``None``.
    rescale_type_as_written
        The RescaleType written in the file when it was read as ``"HU"`` under another spelling (a quirk to log
        once per series), else ``None``.
    padding_value, padding_limit
        Pixel Padding Value (0028,0120) and Pixel Padding Range Limit (0028,0121), in stored values.
    samples_per_pixel
        1 for grey; 3 for colour, whose stored values are RGB with the samples on the last axis
        (``(rows, columns, 3)``), whatever the source's encoding.
    source_photometric
        The source's PhotometricInterpretation when the pixels were converted on decoding (``YBR_FULL_422``,
        ``PALETTE COLOR``...), else ``None``; the derived image is written as what the format says (RGB).
    """

    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0
    rescale_type: str | None = None
    padding_value: int | None = None
    padding_limit: int | None = None
    rescale_type_as_written: str | None = field(default=None, compare=False)
    samples_per_pixel: int = 1
    source_photometric: str | None = None

    def __post_init__(self) -> None:
        if self.bits_allocated not in (8, 16):
            raise SeriesRefused(f"BitsAllocated {self.bits_allocated} is not supported (8 or 16)")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise SeriesRefused(f"BitsStored {self.bits_stored} does not fit BitsAllocated {self.bits_allocated}")
        if self.pixel_representation not in (0, 1):
            raise SeriesRefused(f"PixelRepresentation {self.pixel_representation} is not 0 or 1")
        if self.photometric not in SUPPORTED_PHOTOMETRIC:
            raise SeriesRefused(
                f"photometric interpretation {self.photometric} is not supported (MONOCHROME1, MONOCHROME2 and "
                f"colour as {', '.join(COLOUR_SOURCES)})"
            )
        if self.samples_per_pixel != (3 if self.photometric == "RGB" else 1):
            raise SeriesRefused(f"{self.photometric} with {self.samples_per_pixel} samples per pixel is not valid")
        if not np.isfinite(self.slope) or self.slope == 0 or not np.isfinite(self.intercept):
            raise SeriesRefused(f"rescale slope {self.slope} / intercept {self.intercept} is not usable")

    @property
    def is_colour(self) -> bool:
        """Whether the stored values are RGB (``(..., 3)``)."""
        return self.samples_per_pixel == 3

    def grey(self) -> PixelFormat:
        """The format of a grey summary of these pixels (the channel mean of a colour image); ``self`` if grey."""
        if not self.is_colour:
            return self
        return PixelFormat(self.bits_allocated, self.bits_stored, self.pixel_representation, "MONOCHROME2")

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the stored values (as written in Pixel Data)."""
        kind = "i" if self.pixel_representation else "u"
        return np.dtype(f"<{kind}{self.bits_allocated // 8}")

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest value that BitsStored and PixelRepresentation allow."""
        if self.pixel_representation:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    @property
    def physical_range(self) -> tuple[float, float]:
        """Physical values of the two ends of :attr:`stored_range` (lowest first)."""
        lo, hi = (v * self.slope + self.intercept for v in self.stored_range)
        return (min(lo, hi), max(lo, hi))

    def padding_mask(self, stored: np.ndarray) -> np.ndarray | None:
        """Boolean mask of padding pixels (outside the scan field), or ``None`` when the image has none."""
        if self.padding_value is None:
            return None
        if self.padding_limit is None:
            mask = stored == self.padding_value
        else:
            lo, hi = sorted((self.padding_value, self.padding_limit))
            mask = (stored >= lo) & (stored <= hi)
        return mask if mask.any() else None


def _number(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)):  # multi-valued DS seen in the wild: take the first
        value = value[0]
    return float(value)


#: RescaleType values seen on CT images that mean Hounsfield units (compared in upper case without spaces, dots,
#: underscores or hyphens): GE LightSpeed reformats write ``Houndsfield Unit``.
_HOUNSFIELD_SPELLINGS = frozenset({"HU", "HOUNSFIELD", "HOUNSFIELDUNIT", "HOUNSFIELDUNITS", "HOUNDSFIELD",
                                   "HOUNDSFIELDUNIT", "HOUNDSFIELDUNITS", "HOUNSFIELDSUNIT", "HOUNSFIELDSUNITS"})


def ct_rescale_unit(rescale_type: Any) -> tuple[str | None, str | None]:
    """The unit of a CT image's rescaled values, and the RescaleType as written when that is a quirk.

    For CT images the rescaled values are Hounsfield units unless RescaleType says another defined unit
    (PS3.3 C.8.2.1.1 and C.11.1.1.2): an absent or empty RescaleType, ``HU``, or a recognisable spelling of
    Hounsfield units (``Houndsfield Unit``, ``HOUNSFIELD UNITS``) all mean ``"HU"``. Any other value (``US``,
    ``OD``, free text) is returned as it is, so a model that expects HU refuses the series.

    Returns
    -------
    tuple
        ``(unit, as_written)``: ``as_written`` is the original value when it was read as ``"HU"`` under another
        spelling, else ``None``.
    """
    text = str(rescale_type or "").strip()
    if not text:
        return "HU", None
    if text == "HU":
        return "HU", None
    key = re.sub(r"[\s._\-]", "", text).upper()
    if key in _HOUNSFIELD_SPELLINGS:
        return "HU", text
    return text, None


def pixel_format_from_dataset(ds: Any, frame_rescale: tuple[float, float, str | None] | None = None) -> PixelFormat:
    """Read a :class:`PixelFormat` from a pydicom dataset's Image Pixel and Modality LUT attributes.

    Parameters
    ----------
    ds
        The dataset (pixel data need not be loaded).
    frame_rescale
        ``(slope, intercept, type)`` from an enhanced object's Pixel Value Transformation functional group; it
        replaces the top-level rescale.

    Raises
    ------
    SeriesRefused
        For float pixel data, colour encodings other than :data:`COLOUR_SOURCES` and every format
        :class:`PixelFormat` rejects. Colour images get the RGB format they decode to (:func:`_colour_format`).
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise SeriesRefused("float pixel data is not supported")
    try:
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated))
        pixel_representation = int(ds.get("PixelRepresentation", 0))
    except (AttributeError, TypeError, ValueError) as exc:
        raise SeriesRefused(f"missing or invalid Image Pixel attributes: {exc}") from exc
    if photometric in COLOUR_SOURCES:
        return _colour_format(photometric, samples, bits_allocated, bits_stored, pixel_representation)
    if samples != 1:
        raise SeriesRefused(f"colour image ({samples} samples per pixel, {photometric}) is not supported")
    if frame_rescale is not None:
        slope, intercept, rescale_type = frame_rescale
    else:
        slope = _number(ds.get("RescaleSlope"), 1.0)
        intercept = _number(ds.get("RescaleIntercept"), 0.0)
        rescale_type = ds.get("RescaleType") or None
    modality = str(ds.get("Modality", ""))
    as_written = None
    if modality == "CT":
        rescale_type, as_written = ct_rescale_unit(rescale_type)
    padding = ds.get("PixelPaddingValue")
    limit = ds.get("PixelPaddingRangeLimit")
    return PixelFormat(
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        photometric=photometric,
        slope=slope,
        intercept=intercept,
        rescale_type=str(rescale_type) if rescale_type else None,
        rescale_type_as_written=as_written,
        padding_value=None if padding is None else _padding_int(padding, bits_allocated, pixel_representation),
        padding_limit=None if limit is None else _padding_int(limit, bits_allocated, pixel_representation),
    )


def _colour_format(photometric: str, samples: int, bits_allocated: int, bits_stored: int,
                   pixel_representation: int) -> PixelFormat:
    """The RGB :class:`PixelFormat` a colour source decodes to (see :func:`dicom_node.denoise.series.read_frames`).

    YBR sources decode to 8-bit RGB (pydicom converts them); a palette is looked up into 8-bit RGB (16-bit
    palette entries are reduced to their high byte: the Ultrasound and VL IODs only allow 8-bit RGB); RGB stays as
    stored. Colour images have no Modality LUT and no padding value.
    """
    wanted = 1 if photometric == "PALETTE COLOR" else 3
    if samples != wanted:
        raise SeriesRefused(f"{photometric} with {samples} samples per pixel is not valid (PS3.3 C.7.6.3.1.2)")
    if pixel_representation:
        raise SeriesRefused(f"signed {photometric} pixel data is not supported")
    if photometric == "PALETTE COLOR":
        if bits_allocated not in (8, 16):
            raise SeriesRefused(f"PALETTE COLOR with BitsAllocated {bits_allocated} is not supported (8 or 16)")
        bits_allocated = bits_stored = 8
    elif photometric != "RGB":
        bits_allocated = bits_stored = 8
    return PixelFormat(bits_allocated=bits_allocated, bits_stored=bits_stored, pixel_representation=0,
                       photometric="RGB", samples_per_pixel=3,
                       source_photometric=None if photometric == "RGB" else photometric)


def tissue_region_mask(ds: Any, rows: int, cols: int) -> np.ndarray | None:
    """Pixels inside the ultrasound regions whose RegionDataType is tissue (1), or ``None`` without regions.

    An ultrasound image with a Sequence of Ultrasound Regions (PS3.3 C.8.5.5) says which rectangles hold the
    tissue image; text, calibration bars, spectral Doppler and waveforms lie outside them and must not be
    denoised. Without the sequence the whole image is eligible (``None``); with it but no tissue region, nothing is
    (an all-False mask).
    """
    regions = ds.get("SequenceOfUltrasoundRegions") if ds is not None else None
    if not regions:
        return None
    mask = np.zeros((rows, cols), dtype=bool)
    for region in regions:
        try:
            if int(region.get("RegionDataType", -1)) != 1:
                continue
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue  # a region without a usable location cannot be trusted with pixels
        mask[max(0, y0):max(0, y1 + 1), max(0, x0):max(0, x1 + 1)] = True  # the Max values are inclusive
    return mask


def grey_pixel_mask(rgb: np.ndarray, tolerance: int = GREY_TOLERANCE) -> np.ndarray:
    """Pixels of an RGB image (``(..., 3)``) whose channels agree within ``tolerance``: the grey B-mode."""
    spread = rgb.max(axis=-1).astype(np.int32) - rgb.min(axis=-1)
    return spread <= tolerance


def _padding_int(value: Any, bits_allocated: int, pixel_representation: int) -> int:
    """Padding values are US or SS depending on PixelRepresentation; reinterpret one read with the wrong VR."""
    v = int(value[0] if isinstance(value, (list, tuple)) else value)
    if pixel_representation and v >= 1 << (bits_allocated - 1) and v < 1 << bits_allocated:
        v -= 1 << bits_allocated
    if not pixel_representation and v < 0:
        v += 1 << bits_allocated
    return v


def stored_to_physical(stored: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Physical values (float64) of stored values: ``stored * slope + intercept``."""
    return stored.astype(np.float64) * fmt.slope + fmt.intercept


def physical_to_stored(physical: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Stored values for physical values: inverse rescale, rounded to nearest, clipped to BitsStored."""
    lo, hi = fmt.stored_range
    stored = np.rint((np.asarray(physical, dtype=np.float64) - fmt.intercept) / fmt.slope)
    return np.clip(stored, lo, hi).astype(fmt.dtype)


def clean_stored(stored: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Stored values as ``fmt.dtype`` (decoders may return wider types), checked against BitsStored.

    Values outside the BitsStored range (garbage in unused high bits) are reported and clipped.
    """
    lo, hi = fmt.stored_range
    arr = np.asarray(stored)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        LOGGER.warning("stored values %s..%s exceed BitsStored %d range %s..%s; clipping",
                       arr.min(), arr.max(), fmt.bits_stored, lo, hi)
        arr = np.clip(arr, lo, hi)
    return arr.astype(fmt.dtype, copy=False)


@dataclass(frozen=True)
class Scaling:
    """The affine map of one image from physical values to network input: ``x = sign * (v - offset) / scale``.

    ``sign`` is -1 for inverted (MONOCHROME1) images, where ``offset`` is the inverted image's reference.
    """

    offset: float
    scale: float
    sign: float = 1.0
    clip_low: float = -np.inf
    clip_high: float = np.inf
    fill: float = 0.0  # physical value given to padding pixels in the network input

    def to_network(self, physical: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Network input (float32) for physical values; padding pixels get :attr:`fill`."""
        v = np.clip(physical, self.clip_low, self.clip_high)
        if mask is not None:
            v = np.where(mask, self.fill, v)
        return (self.sign * (v - self.offset) / self.scale).astype(np.float32)

    def residual_to_stored(self, residual: np.ndarray, fmt: PixelFormat) -> np.ndarray:
        """A change of network values as a (float64) change of stored values."""
        return residual.astype(np.float64) * (self.sign * self.scale / fmt.slope)


def scaling_for(physical: np.ndarray, fmt: PixelFormat, normalization: Any, mask: np.ndarray | None = None) -> Scaling:
    """The :class:`Scaling` a model card's normalisation (``models.folder.Normalization``) gives this image.

    ``fixed`` mode uses the card's offset, scale and clip (in physical units); ``per-image`` mode takes offset
    and scale from the image's percentiles over non-padding pixels. MONOCHROME1 images are inverted when the card
    says so (``v -> lo + hi - v`` over the format's physical range, so fixed offsets keep their meaning).
    """
    invert = fmt.photometric == "MONOCHROME1" and bool(getattr(normalization, "invert_monochrome1", True))
    sign = -1.0 if invert else 1.0
    clip = getattr(normalization, "clip", None)
    clip_low, clip_high = (float(clip[0]), float(clip[1])) if clip else (-np.inf, np.inf)
    valid = physical if mask is None else physical[~mask]
    if normalization.mode == "per-image":
        if valid.size == 0:
            p_lo = p_hi = 0.0
        else:
            p_lo, p_hi = np.percentile(valid, [normalization.percentiles[0], normalization.percentiles[1]])
        if invert:
            offset, scale = float(p_hi), float(p_hi - p_lo)
        else:
            offset, scale = float(p_lo), float(p_hi - p_lo)
        if not np.isfinite(scale) or scale <= 0:
            scale = 1.0
        fill = float(p_hi if invert else p_lo)
        return Scaling(offset=offset, scale=scale, sign=sign, fill=fill)
    offset = float(normalization.offset)
    if invert:
        lo, hi = fmt.physical_range
        offset = lo + hi - offset  # sign * (v - offset') == ((lo + hi - v) - offset)
    if np.isfinite(clip_low):
        fill = clip_low if not invert else clip_high
    else:
        fill = float(valid.min()) if valid.size else 0.0
    return Scaling(offset=offset, scale=float(normalization.scale), sign=sign, clip_low=clip_low,
                   clip_high=clip_high, fill=fill)


def checked_strength(strength: float) -> float:
    """``strength`` as a float when it is in [0, 1] (the blend of output and input); ``ValueError`` otherwise.

    The one place the rule is written: the derivation, the engine and :func:`apply_residual` all call it.
    """
    value = float(strength)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"strength must be in [0, 1], not {strength}")
    return value


def apply_residual(stored: np.ndarray, residual_net: np.ndarray, scaling: Scaling, fmt: PixelFormat,
                   strength: float = 1.0, mask: np.ndarray | None = None) -> np.ndarray:
    """New stored values: the original plus ``strength`` times the network's change, rounded and clipped.

    Parameters
    ----------
    stored
        The original stored values (``(rows, columns)``, or ``(rows, columns, 3)`` for RGB).
    residual_net
        ``network(x) - x`` in network units (zero where nothing should change), of ``stored``'s shape or
        broadcastable to it (a grey residual ``(rows, columns, 1)`` changes the three channels of RGB alike).
    strength
        In [0, 1]: 0 returns the input, 1 the full network output, between them a linear blend.
    mask
        ``(rows, columns)``: pixels returned untouched (padding; for colour, what must not be denoised).
    """
    delta = scaling.residual_to_stored(residual_net, fmt) * checked_strength(strength)
    lo, hi = fmt.stored_range
    out = np.clip(np.rint(stored.astype(np.float64) + delta), lo, hi).astype(fmt.dtype)
    if mask is not None:
        out[mask] = stored[mask]
    return out
