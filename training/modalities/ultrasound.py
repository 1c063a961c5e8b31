"""Ultrasound recipe (US): speckle and electronic noise simulated on the envelope, before log compression.

Speckle is part of an ultrasound image (it carries tissue texture that readers use), so the model must *reduce*
it, not erase it. The clean target is the real image, speckle and all; the input is that image with *more*
speckle and electronic noise, simulated where they arise (:func:`speckle_noisy`):

1. the 8-bit log-compressed image ``I`` (0..``top``) back to an envelope with an assumed dynamic range ``DR``
   (dB): ``A = 10 ** ((I / top - 1) * DR / 20)`` (``I = top`` -> 1, ``I = 0`` -> the display floor ``-DR`` dB);
2. the echo of each pixel times ``L`` looks of spatially correlated complex Gaussian speckle (the complex fields
   blurred by an anisotropic Gaussian of the speckle size: axial ``speckle_sigma`` px, lateral that times
   ``lateral_ratio``), plus complex electronic noise of SD ``e`` (``e_db`` dB above the display floor), averaged
   in intensity: ``A' = sqrt(mean_k |A z_k + e n_k|^2)``, so ``A'^2 / A^2`` is Gamma(L, 1/L)-distributed where
   the electronic noise is negligible (fully developed speckle for ``L = 1``; each look halves nothing but adds
   averaging);
3. log-compressed again with the same ``DR`` and quantised to the image's integers.

Multiplicative speckle on the envelope is *additive* after log compression (``log A' = log A + log |z|``), with
the same distribution at every echo level; the electronic noise adds where the echo is weak (dark regions). The
network learns to remove the added part, which looks like the image's own speckle, so at full strength it also
smooths some real speckle: the card's ``strength_range`` lets the site choose how much.

Images: the HC18 fetal-head B-mode PNGs (8-bit grey, already log-compressed), and the grey pixels of ultrasound
DICOM files (palette colour or YBR converted to RGB; pixels whose channels agree within the node's tolerance,
inside the tissue regions of the Sequence of Ultrasound Regions, minus two pixels around every coloured one:
Doppler overlays, coloured graphics).
Overlays (``[recipe] overlay_probability``): a fraction of the training patches get burnt-in text (PIL's default
bitmap font, grey 150-255), thin grey lines, calipers and depth ticks, and black (0) bands or wedges like the area
outside a sector (:func:`us_overlay`), pasted into the clean patch *and* the noisy input, identical in both: a
scanner draws them after log compression, and outside the sector it displays a digital 0 with no noise. Files
without a Sequence of Ultrasound Regions (NEMA US1) put such pixels in front of the network, which must leave
them as they are. Speckle and electronic noise fall only on the B-mode pixels. Validation patches get none, so
the validation gain stays comparable between versions.

Split by subject: the HC18 file name's number (``033_2HC.png`` is subject ``033``'s second image), hashed
(:func:`training.modalities.xray.assign_split`); DICOM files by name (``[recipe] train`` / ``test``).

Evaluation (:func:`evaluate`): held-out images at the levels of :data:`EVAL_LEVELS`, PSNR (data range 255, the
8-bit display range) and SSIM over the grey pixels against the clean image, for the noisy input, the model at
strength 1.0 and 0.5, non-local means (scikit-image) on the log image with the oracle SD of the added
log-domain noise, and BM3D on the log image (a 256 px centre crop) with the oracle power spectrum of that noise
(speckle is correlated: a white-noise BM3D leaves it as blotches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.modalities.xray import (
    Image2D,
    PatchPairs,
    Scored,
    _expand,
    _quiet,
    bm3d_coloured,
    cached,
    centre_crop,
    fixed_validation,
    nlm,
    recipe_settings,
    run_model,
    save_panels,
    scores,
    scoring_setup,
    split_images,
    split_summary,
    store_card_metrics,
    write_report,
)

LOGGER = __import__("logging").getLogger(__name__)

#: name -> (looks, speckle_sigma px, lateral_ratio, electronic dB above the floor, dynamic range dB).
EVAL_LEVELS: dict[str, tuple[int, float, float, float, float]] = {
    "moderate": (4, 2.0, 2.0, -6.0, 55.0),  # log-domain speckle SD 2.3 dB (11 grey levels)
    "strong": (2, 2.0, 2.0, 3.0, 55.0),  # 3.5 dB (16 grey levels); dark regions filled to about 3 dB
}
RECIPE_DEFAULTS: dict[str, Any] = {
    "looks_range": [1, 16],  # integer looks, log-uniform
    "speckle_sigma_range": [1.0, 3.0],  # axial correlation of the complex field, pixels
    "lateral_ratio_range": [1.0, 3.0],  # lateral / axial speckle size
    "electronic_db_range": [-20.0, 10.0],  # electronic noise SD relative to the display floor, dB
    "dynamic_range_db": [50.0, 60.0],  # assumed log-compression dynamic range, drawn per patch
    "validation_fraction": 0.05,
    "test_fraction": 0.12,
    "train": [],
    "test": [],
    "modalities": ["US"],
    "strength_range": [0.0, 1.0],
    "overlay_probability": 0.0,  # fraction of training patches with text, graphics and black areas pasted in
}
#: Pixels beyond each patch edge the noise needs: none, the speckle is filtered circularly (a stationary field on
#: the torus, so any patch of it is a correctly correlated field).
US_MARGIN = 0


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def us_subject(name: str) -> str:
    """HC18 subject of a file name: ``033_2HC.png`` -> ``033``; other names: the stem."""
    head = Path(name).stem.split("_")[0]
    return head if head.isdigit() else Path(name).stem


def dicom_grey_bmode(path: str | Path) -> Image2D:
    """The grey B-mode of an ultrasound DICOM file: grey values 0..255 and the mask of grey tissue pixels.

    Palette colour goes through its lookup table, YBR to RGB; a pixel is grey when its channels agree within the
    node's ``GREY_TOLERANCE`` (8 levels) and its value is their mean, as the node takes it. The mask keeps
    grey pixels inside the regions whose RegionDataType is tissue (1) when the file has a Sequence of Ultrasound
    Regions, and drops two pixels around every coloured pixel (Doppler overlays, coloured graphics). First frame
    of a cine.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space
    from scipy import ndimage

    from dicom_node.denoise.pixels import grey_pixel_mask

    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(ds.PhotometricInterpretation)
    if frames > 1:
        pixels = pixels[0]
    top_in = 2 ** int(ds.BitsStored) - 1
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(pixels, ds), dtype=np.float64)
        top_in = 65535 if rgb.max() > 255 else 255
    elif photometric.startswith("YBR"):
        rgb = np.asarray(convert_color_space(pixels, photometric, "RGB"), dtype=np.float64)
    elif photometric == "RGB":
        rgb = pixels.astype(np.float64)
    else:  # MONOCHROME
        rgb = np.repeat(pixels.astype(np.float64)[..., None], 3, axis=-1)
        if photometric == "MONOCHROME1":
            rgb = top_in - rgb
    rgb8 = rgb / 256.0 if top_in > 255 else rgb  # 16-bit palettes: 8-bit levels times 256
    grey = grey_pixel_mask(np.rint(rgb8))  # the node's test: channels within GREY_TOLERANCE
    mask = grey & ~ndimage.binary_dilation(~grey, iterations=2)
    regions = getattr(ds, "SequenceOfUltrasoundRegions", None)
    if regions:
        inside = np.zeros_like(mask)
        for r in regions:
            if int(getattr(r, "RegionDataType", 0)) == 1:  # tissue
                inside[int(r.RegionLocationMinY0):int(r.RegionLocationMaxY1) + 1,
                       int(r.RegionLocationMinX0):int(r.RegionLocationMaxX1) + 1] = True
        if inside.any():
            mask &= inside
    values = rgb8.mean(axis=-1)  # the node denoises the channel mean of a grey pixel
    return Image2D(name=Path(path).name, pixels=np.rint(values).astype(np.float32), subject=Path(path).stem,
                   value_range=(0.0, 255.0), processed=True, mask=mask, source=str(path),
                   extra={"photometric": photometric})


def read_us_images(paths: Sequence[str | Path]) -> list[Image2D]:
    """B-mode images from PNG/JPEG files (grey) and DICOM files (their grey B-mode pixels) in files and folders."""
    from training.modalities.xray import PNG_SUFFIXES, read_png_grey

    out: list[Image2D] = []
    for path in _expand(paths):
        if path.suffix.lower() in PNG_SUFFIXES:
            out.append(Image2D(name=path.name, pixels=read_png_grey(path), subject=us_subject(path.name),
                               value_range=(0.0, 255.0), processed=True, source=str(path)))
        else:
            try:
                out.append(dicom_grey_bmode(path))
            except Exception as exc:  # not DICOM, or no pixels
                LOGGER.info("skipping %s: %s", path, exc)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------


def to_envelope(log_image: np.ndarray, top: float, dynamic_range_db: float) -> np.ndarray:
    """Undo log compression: display value ``top`` -> envelope 1, 0 -> ``10 ** (-DR / 20)``."""
    return 10.0 ** ((log_image.astype(np.float64) / top - 1.0) * dynamic_range_db / 20.0)


def to_log(envelope: np.ndarray, top: float, dynamic_range_db: float) -> np.ndarray:
    """Log compression: envelope -> display values (not clipped, not rounded)."""
    return top * (1.0 + 20.0 * np.log10(np.maximum(envelope, 1e-12)) / dynamic_range_db)


def correlated_complex(shape: tuple[int, ...], sigma_axial: float, sigma_lateral: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian fields with ``E|z|^2 = 1``, correlated by a Gaussian of (axial, lateral) sigma in pixels.

    ``shape`` is ``(..., H, W)``: every leading index is an independent field. Filtered in the Fourier domain
    (circular: a stationary field on the torus, correctly correlated everywhere), all fields at once.
    """
    h, w = shape[-2:]
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * math.pi**2 * ((sigma_axial * fy) ** 2 + (sigma_lateral * fx) ** 2))
    full = np.exp(-2.0 * math.pi**2 * ((sigma_axial * np.fft.fftfreq(h)[:, None]) ** 2
                                       + (sigma_lateral * np.fft.fftfreq(w)[None, :]) ** 2))
    gain = math.sqrt(float(np.mean(full**2)))  # SD of white noise after the filter
    re = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32)) * transfer, s=(h, w))
    im = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32)) * transfer, s=(h, w))
    return (re + 1j * im) / (math.sqrt(2.0) * gain)


def speckle_envelope(envelope: np.ndarray, looks: int, sigma_axial: float, sigma_lateral: float,
                     electronic_sd: float, rng: np.random.Generator) -> np.ndarray:
    """``sqrt(mean_k |A z_k + e n_k|^2)`` over ``looks`` independent speckle (``z``) and noise (``n``) fields."""
    looks = max(1, int(looks))
    fields = correlated_complex((2 * looks, *envelope.shape), sigma_axial, sigma_lateral, rng)
    z, n = fields[:looks], fields[looks:]
    return np.sqrt(np.mean(np.abs(envelope * z + electronic_sd * n) ** 2, axis=0))


def speckle_noisy(clean: np.ndarray, top: float, looks: int, sigma_axial: float, lateral_ratio: float,
                  electronic_db: float, dynamic_range_db: float, rng: np.random.Generator,
                  quantise: bool = True) -> np.ndarray:
    """The log image ``clean`` (0..``top``) with added speckle and electronic noise (see the module docstring)."""
    envelope = to_envelope(clean, top, dynamic_range_db)
    electronic_sd = 10.0 ** ((electronic_db - dynamic_range_db) / 20.0)
    noisy = to_log(speckle_envelope(envelope, looks, sigma_axial, sigma_axial * lateral_ratio, electronic_sd, rng),
                   top, dynamic_range_db)
    if not quantise:
        return noisy
    return np.clip(np.rint(noisy), 0.0, top).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Overlays: text, graphics and black areas, the same in input and target
# ---------------------------------------------------------------------------------------------------------------

_TEXT_WORDS = ("LYMPH NODE", "THYROID", "LIVER", "KIDNEY", "FETAL HEAD", "BPD", "HC", "AC", "FL", "GA", "TIS",
               "MI", "FR", "GAIN", "DR", "DEPTH", "FREQ", "RT", "LT", "TRANS", "SAG", "LONG", "CM", "MM", "HZ",
               "DIST", "AREA", "C5-2", "L12-5", "P", "R", "ABD", "OB", "CARD")


def _random_text(rng: np.random.Generator) -> str:
    """A short scanner-like annotation: a word, a number with a unit, or random letters and digits."""
    kind = int(rng.integers(4))
    if kind == 0:
        return str(rng.choice(_TEXT_WORDS))
    if kind == 1:
        return f"{rng.choice(_TEXT_WORDS)} {rng.uniform(0, 30):.{int(rng.integers(0, 3))}f}"
    if kind == 2:
        return f"{int(rng.integers(0, 100))}{rng.choice(['', 'dB', 'cm', 'mm', 'Hz', '%', 'fps'])}"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:/-+ "
    return "".join(str(c) for c in rng.choice(list(alphabet), int(rng.integers(2, 11)))).strip() or "X"


def _draw_text(values: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Burnt-in text, PIL's default bitmap font at 1x or 2x, one grey level 150-255; on a black box sometimes."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = values.shape
    zoom = int(rng.choice([1, 1, 2]))
    small = (max(1, h // zoom), max(1, w // zoom))
    canvas = Image.new("L", (small[1], small[0]), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default_imagefont()
    for _ in range(int(rng.integers(1, 4))):  # one to three lines
        x, y = int(rng.integers(-4, max(1, small[1] - 8))), int(rng.integers(-4, max(1, small[0] - 6)))
        draw.text((x, y), _random_text(rng), fill=255, font=font)
    ink = np.asarray(canvas) > 0
    if zoom > 1:
        ink = np.kron(ink, np.ones((zoom, zoom), dtype=bool))
    full = np.zeros((h, w), dtype=bool)
    full[:ink.shape[0], :ink.shape[1]] = ink[:h, :w]
    if not full.any():
        return
    if rng.random() < 0.3:  # text on a black box (the band below or beside the image)
        from scipy import ndimage

        box = ndimage.binary_dilation(full, iterations=int(rng.integers(1, 4)))
        values[box], mask[box] = 0.0, True
    values[full], mask[full] = float(rng.integers(150, 256)), True


def _draw_lines(values: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Thin grey graphics: frame lines (solid or dashed), a caliper cross, a depth scale with ticks."""
    from PIL import Image, ImageDraw

    h, w = values.shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(4))
        width = int(rng.choice([1, 1, 1, 2]))
        if kind == 0:  # a frame line, horizontal or vertical, solid or dashed
            c = int(rng.integers(0, h if rng.random() < 0.5 else w))
            horizontal = rng.random() < 0.5
            dash, gap = (int(rng.integers(2, 8)), int(rng.integers(2, 8))) if rng.random() < 0.4 else (max(h, w), 0)
            for a in range(0, max(h, w), dash + gap):
                ends = [(a, c), (a + dash - 1, c)] if horizontal else [(c, a), (c, a + dash - 1)]
                draw.line(ends, fill=255, width=width)
        elif kind == 1:  # a line at an angle (a sector edge, a measurement)
            draw.line([(int(rng.integers(w)), int(rng.integers(h))), (int(rng.integers(w)), int(rng.integers(h)))],
                      fill=255, width=width)
        elif kind == 2:  # a caliper: '+' or 'x', 5-11 px
            x, y, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(2, 6))
            if rng.random() < 0.5:
                draw.line([(x - r, y), (x + r, y)], fill=255, width=width)
                draw.line([(x, y - r), (x, y + r)], fill=255, width=width)
            else:
                draw.line([(x - r, y - r), (x + r, y + r)], fill=255, width=width)
                draw.line([(x - r, y + r), (x + r, y - r)], fill=255, width=width)
        else:  # a depth scale: a vertical line with ticks every few pixels, longer every fifth
            x, step = int(rng.integers(2, max(3, w - 6))), int(rng.integers(4, 16))
            if rng.random() < 0.5:
                draw.line([(x, 0), (x, h)], fill=255, width=1)
            for n, y in enumerate(range(int(rng.integers(step)), h, step)):
                draw.line([(x, y), (x + (5 if n % 5 == 0 else 2), y)], fill=255, width=1)
    ink = np.asarray(canvas) > 0
    values[ink], mask[ink] = float(rng.integers(150, 256)), True


def _draw_black(values: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """A black (0) area: a band from an edge, a wedge beyond a slanted sector edge, or beyond a sector's arc."""
    h, w = values.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = int(rng.integers(3))
    if kind == 0:  # band: rows or columns from one edge
        size = int(rng.integers(3, max(4, (h if rng.random() < 0.5 else w) // 2)))
        region = [yy < size, yy >= h - size, xx < size, xx >= w - size][int(rng.integers(4))]
    elif kind == 1:  # beyond a straight edge through the patch at any angle
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        region = (yy - cy) * math.cos(angle) + (xx - cx) * math.sin(angle) > 0
    else:  # beyond a circular arc (the bottom of a sector, or the apex)
        radius = rng.uniform(0.5, 3.0) * max(h, w)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cy = h / 2 + (radius - rng.uniform(-0.3, 0.3) * h) * math.cos(angle)
        cx = w / 2 + (radius - rng.uniform(-0.3, 0.3) * w) * math.sin(angle)
        inside = np.hypot(yy - cy, xx - cx) < radius
        region = ~inside if rng.random() < 0.5 else inside
    values[region], mask[region] = 0.0, True


def us_overlay(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(values, mask)``: one to three of text, grey lines and black areas for a patch of ``shape``.

    ``mask`` marks the overlay pixels, ``values`` their grey levels (text and graphics 150-255, black areas 0);
    pasted into the clean patch and the noisy input alike (:class:`OverlayPatchPairs`).
    """
    values = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    kinds = rng.permutation(3)[:int(rng.integers(1, 4))]
    for kind in sorted(kinds, key=lambda k: (k != 2, k)):  # black first, graphics and text drawn over it
        (_draw_text, _draw_lines, _draw_black)[int(kind)](values, mask, rng)
    return values, mask


class OverlayPatchPairs(PatchPairs):
    """:class:`PatchPairs` whose training patches get, with probability ``overlay_probability``, an overlay
    (:func:`us_overlay`) pasted into the clean patch before the noise and into the noisy patch after it: overlay
    pixels are the same in input and target, noise falls only on the B-mode pixels."""

    def __init__(self, *args: Any, overlay_probability: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlay_probability = float(overlay_probability)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, np.random.Generator]:
        """``(noisy, clean, overlay mask or None, image index, rng)`` of item ``index``, before normalisation and
        augmentation."""
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.choice(len(self.images), p=self.weights))
        im, p, m = self.images[k], self.patch, self.margin
        y, x = self._origin(k, rng)
        clean = im.pixels[y - m:y + p + m, x - m:x + p + m].astype(np.float32)
        overlay: np.ndarray | None = None
        values = np.zeros_like(clean)
        if self.overlay_probability > 0.0 and rng.random() < self.overlay_probability:
            values, overlay = us_overlay(clean.shape, rng)
            clean = np.where(overlay, values, clean).astype(np.float32)
        noisy = self.noise(im, clean, self.params[k], rng)
        if overlay is not None:
            noisy = np.where(overlay, values, noisy).astype(np.float32)
            overlay = overlay[m:m + p, m:m + p]
        return noisy[m:m + p, m:m + p], clean[m:m + p, m:m + p], overlay, k, rng

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        from training.data import augment

        noisy, clean, _, k, rng = self.pair(index)
        offset, scale = self.params[k]
        a = torch.from_numpy(((noisy - offset) / scale).astype(np.float32))[None]
        b = torch.from_numpy(((clean - offset) / scale).astype(np.float32))[None]
        if self.augment:
            a, b = augment((a, b), rng)
        return a, b


def draw_us_level(recipe: dict[str, Any], rng: np.random.Generator) -> tuple[int, float, float, float, float]:
    """``(looks, speckle_sigma, lateral_ratio, electronic_db, dynamic_range_db)`` from the recipe's ranges."""
    l0, l1 = recipe["looks_range"]
    looks = int(round(math.exp(rng.uniform(math.log(l0), math.log(l1)))))
    return (looks, float(rng.uniform(*recipe["speckle_sigma_range"])),
            float(rng.uniform(*recipe["lateral_ratio_range"])), float(rng.uniform(*recipe["electronic_db_range"])),
            float(rng.uniform(*recipe["dynamic_range_db"])))


# ---------------------------------------------------------------------------------------------------------------
# Datasets and card
# ---------------------------------------------------------------------------------------------------------------


def _settings(cfg) -> dict[str, Any]:
    from training.config import TrainingConfigError

    where = cfg.source or "config"
    settings = recipe_settings(cfg.recipe, RECIPE_DEFAULTS, where)
    p = settings["overlay_probability"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise TrainingConfigError(f"{where} [recipe]: overlay_probability must be a number in [0, 1], got {p!r}")
    return settings


def build_datasets(cfg, progress: bool = True):
    """Ultrasound training and validation patches; ``[recipe] data`` lists files and folders."""
    recipe = _settings(cfg)
    images = read_us_images([cfg.data_path(p) for p in recipe.get("data", [])])
    parts = split_images(images, recipe)
    if not parts["train"]:
        raise FileNotFoundError("no ultrasound training images (check [recipe] data)")
    d = cfg.data

    def noise(im: Image2D, clean: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
        return speckle_noisy(clean, im.value_range[1], *draw_us_level(recipe, rng), rng)

    train = OverlayPatchPairs(parts["train"], noise, d.patch, cfg.train.steps * d.batch, cfg.seed, margin=US_MARGIN,
                              overlay_probability=float(recipe["overlay_probability"]))
    val = None
    if parts["validation"]:
        val = fixed_validation(PatchPairs(parts["validation"], noise, d.patch, d.validation_patches,
                                          cfg.seed + 1000, augment=False, margin=US_MARGIN))
    summary = split_summary(parts)
    summary["split"] = "by subject (HC18 file-name number, stable hash; DICOM files by name)"
    if progress:
        LOGGER.info("ultrasound images: %s", {k: len(v) for k, v in parts.items()})
    return train, val, summary


def card_modalities(cfg) -> list[str]:
    """The modalities an ultrasound model's card lists (``US``)."""
    return list(_settings(cfg)["modalities"])


def card_noise(cfg) -> dict[str, Any]:
    """The card's ``[noise]`` table: the simulation and the ranges it drew from."""
    settings = _settings(cfg)
    return {"model": "speckle and electronic noise on the envelope (training/modalities/ultrasound.py)",
            **{k: settings[k] for k in ("looks_range", "speckle_sigma_range", "lateral_ratio_range",
                                        "electronic_db_range", "dynamic_range_db", "overlay_probability")}}


def card_strength_range(cfg) -> list[float]:
    """The strengths a rule may set for this model (``[recipe] strength_range``)."""
    return [float(v) for v in _settings(cfg)["strength_range"]]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def evaluate(model_dir: str | Path, data: Sequence[str], out_dir: str | Path, *, seed: int = 1234,
             max_images: int = 6, progress: Callable[[str], None] = _quiet, write_card: bool = False,
             crop: int = 256, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Score an ultrasound model on held-out images (see the module docstring); writes metrics.json, table.md and
    one figure per image. ``data``: PNG files/folders and DICOM files (from folders only the card's test images)."""
    network, card, out, images = scoring_setup(model_dir, data, out_dir, read_us_images, max_images, "ultrasound")
    cache = Path(cache_dir) if cache_dir else None
    scored: list[Scored] = []
    for n, im in enumerate(images, 1):
        mask = im.mask
        box = centre_crop(im.pixels.shape, crop, mask)
        crop_mask = mask[box] if mask is not None else None
        for li, (level, (looks, sig, ratio, e_db, dr)) in enumerate(EVAL_LEVELS.items()):
            progress(f"image {n}/{len(images)} {im.name}, {level}")
            rng = np.random.default_rng([seed, n, li])
            noisy = speckle_noisy(im.pixels, 255.0, looks, sig, ratio, e_db, dr, rng)
            if mask is not None:
                noisy = np.where(mask, noisy, im.pixels).astype(np.float32)
            added = (noisy - im.pixels)[mask] if mask is not None else noisy - im.pixels
            sigma = float(np.std(added))  # oracle: SD of the added log-domain noise
            key = f"us:{im.name}:{level}:{seed}:{n}:{li}:{sigma:.5f}"
            out_model = run_model(network, card, noisy, mask)
            half = (noisy + 0.5 * (out_model - noisy)).astype(np.float32)
            out_nlm = cached(cache, "nlm:" + key, nlm, noisy, sigma)
            out_bm3d = cached(cache, f"bm3d:{crop}:" + key, bm3d_coloured, noisy[box], (noisy - im.pixels)[box])
            if mask is not None:
                out_nlm = np.where(mask, out_nlm, im.pixels).astype(np.float32)
            whole = {"input": noisy, "model": out_model, "model_s0.5": half, "nlm": out_nlm}
            rows = {m: scores(v, im.pixels, 255.0, mask) for m, v in whole.items()}
            crop_rows = {m: scores(v[box], im.pixels[box], 255.0, crop_mask) for m, v in whole.items()}
            crop_rows["bm3d"] = scores(out_bm3d, im.pixels[box], 255.0, crop_mask)
            scored.append(Scored(im.name, level, rows, crop_rows,
                                 {"noise_sd": round(sigma, 3), "looks": looks, "speckle_sigma": sig,
                                  "lateral_ratio": ratio, "electronic_db": e_db, "dynamic_range_db": dr,
                                  "grey_fraction": float(mask.mean()) if mask is not None else 1.0}))
            if level == "strong":
                c = im.pixels[box]
                save_panels(out / f"{Path(im.name).stem}-{level}.png",
                            f"{card.name} {card.version}: {im.name}, {level} (crop {crop} px; PSNR model "
                            f"{crop_rows['model']['psnr']:.1f}, NLM {crop_rows['nlm']['psnr']:.1f}, BM3D "
                            f"{crop_rows['bm3d']['psnr']:.1f} dB)",
                            {"clean": c, "noisy": noisy[box], "NLM": out_nlm[box], "BM3D": out_bm3d,
                             "model": out_model[box], "model, strength 0.5": half[box],
                             "|model - clean|": np.abs(out_model[box] - c)}, (0.0, 255.0))
    settings = {"levels": {k: dict(zip(("looks", "speckle_sigma", "lateral_ratio", "electronic_db",
                                        "dynamic_range_db"), v)) for k, v in EVAL_LEVELS.items()},
                "baseline_sigma": "oracle: NLM the true SD of the added log-domain noise, BM3D its power "
                                  "spectrum; both on the 8-bit log image",
                "crop": crop, "seed": seed, "psnr_range": 255.0,
                "methods": ["input", "model (strength 1)", "model_s0.5 (strength 0.5)", "nlm", "bm3d (crop)"]}
    metrics = write_report(out, card.name, scored, settings, ["input", "model", "model_s0.5", "nlm", "bm3d"])
    if write_card:
        store_card_metrics(model_dir, metrics)
    return metrics
