"""Endoscopy recipe (``[noise] kind = "endoscopy"``): colour stills, low-light sensor noise in linear RGB, JPEG.

Images
    RGB stills: DICOM (Secondary Capture, VL Endoscopic; RGB, YBR or palette, converted to RGB; every frame of a
    multi-frame object is one image) and JPEG/PNG exports. Values are scaled to ``[0, 1]`` (``/ 255`` for 8-bit).
    An image counts as *lossy* when it is a JPEG file or its DICOM header says ``LossyImageCompression = "01"``;
    a JPEG file's own quality is estimated from its luminance quantisation table.

Noise (:func:`simulate_low_light`), as a camera makes it
    1. undo the display gamma (sRGB, or a power ``gamma``) to reach linear light;
    2. scale the light down: ``light`` is the photo-electrons a full-scale white pixel collects (a few tens in a
       dim cavity, thousands in good light), drawn log-uniformly in ``light_range``;
    3. Poisson shot noise per channel plus Gaussian read noise (``read_noise_range`` electrons), optionally on a
       Bayer mosaic (RGGB) whose noise is then demosaiced bilinearly (spatially correlated colour noise);
    4. scale back up (the camera's gain), re-apply the gamma, quantise to 8 bits;
    5. JPEG (Pillow, 4:2:0) at the source's quality for lossy sources (``jpeg_quality_range`` when unknown).

    Only the *noise* goes through the mosaic: the signal stays the clean image, so the network learns to
    denoise, not to demosaic. The simulated noise is unbiased in linear light before clipping to the 8-bit range.

Augmentation
    random crops (and 2x area-downscaled crops), flips and 90-degree rotations, and colour temperature and
    brightness jitter applied to the clean image in linear light before the noise (so the pair stays consistent).

Video
    no endoscopic video exists in the shared data, so the bundled model is trained with ``context = 0`` (one
    frame); the recipe itself only builds single-frame pairs.

Evaluation (:func:`evaluate`)
    held-out images at fixed light levels (``evaluate_light_levels``), scored against the clean image by PSNR and
    SSIM on ``[0, 1]`` and the per-channel mean difference (% of the range), beside CBM3D (``bm3d.bm3d_rgb``) and
    scikit-image's colour non-local means, both given the oracle per-channel noise SD (the true SD of
    noisy - clean; white-noise assumption).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: Modalities the card lists (endoscopy; external-camera photography; other, as the NEMA stills are stored).
CARD_MODALITIES = ["ES", "XC", "OT"]

# IJG's standard luminance quantisation table (quality 50), for estimating a JPEG file's quality.
_IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


def _quiet(_message: str) -> None:
    pass


@dataclass
class EndoscopySettings:
    """The ``[recipe]`` table of an endoscopy training config (all optional).

    Attributes
    ----------
    light_range
        Photo-electrons collected by a full-scale white pixel, drawn log-uniformly per patch (low = darker).
    read_noise_range
        Gaussian read noise SD in electrons, drawn uniformly per patch.
    gamma
        ``"srgb"`` or a number (a pure power law, e.g. 2.2) for the camera's display gamma.
    bayer_probability
        Fraction of patches whose noise is made on an RGGB mosaic and demosaiced (correlated colour noise).
    jpeg_quality_range
        Pillow JPEG qualities drawn for lossy sources whose own quality is unknown.
    jpeg_probability_lossy, jpeg_probability_uncompressed
        Probability that a patch of a lossy / an uncompressed source is JPEG-compressed after the noise (many
        endoscopy systems store JPEG even when these stills were not).
    colour_temperature_range
        Red/blue gain ``t`` (red times ``t``, blue divided by ``t``) applied in linear light.
    brightness_range
        Linear-light brightness factor applied before the noise.
    downscale_probability
        Fraction of patches cut at twice the size and area-averaged 2x (scale augmentation).
    evaluate_light_levels, evaluate_read_noise, evaluate_crop, evaluate_jpeg_quality
        What :func:`evaluate` scores: light levels (electrons at white), read noise, the centred crop (px; 0 =
        the whole image) and the JPEG quality for lossy sources of unknown quality.
    """

    light_range: list[float] = field(default_factory=lambda: [15.0, 600.0])
    read_noise_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    gamma: str | float = "srgb"
    bayer_probability: float = 0.5
    jpeg_quality_range: list[int] = field(default_factory=lambda: [75, 95])
    jpeg_probability_lossy: float = 0.9
    jpeg_probability_uncompressed: float = 0.3
    colour_temperature_range: list[float] = field(default_factory=lambda: [0.85, 1.15])
    brightness_range: list[float] = field(default_factory=lambda: [0.6, 1.2])
    downscale_probability: float = 0.3
    evaluate_light_levels: list[float] = field(default_factory=lambda: [30.0, 100.0, 300.0])
    evaluate_read_noise: float = 2.0
    evaluate_crop: int = 384
    evaluate_jpeg_quality: int = 85

    @classmethod
    def from_table(cls, table: dict[str, Any] | None, where: str = "[recipe]") -> EndoscopySettings:
        """Validate a ``[recipe]`` table; unknown keys and impossible values raise ``ValueError`` naming the key."""
        table = dict(table or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        s = cls(**table)
        problems = []
        if not 0 < s.light_range[0] <= s.light_range[1]:
            problems.append("light_range must be [low, high] with 0 < low <= high")
        if not 0 <= s.read_noise_range[0] <= s.read_noise_range[1]:
            problems.append("read_noise_range must be [low, high] with 0 <= low <= high")
        if not (s.gamma == "srgb" or (isinstance(s.gamma, (int, float)) and s.gamma > 0)):
            problems.append(f"gamma must be \"srgb\" or a positive number, not {s.gamma!r}")
        if not 1 <= s.jpeg_quality_range[0] <= s.jpeg_quality_range[1] <= 100:
            problems.append("jpeg_quality_range must be within 1-100")
        for name in ("bayer_probability", "jpeg_probability_lossy", "jpeg_probability_uncompressed",
                     "downscale_probability"):
            if not 0 <= getattr(s, name) <= 1:
                problems.append(f"{name} must be within [0, 1]")
        if min(s.evaluate_light_levels, default=0) <= 0:
            problems.append("evaluate_light_levels must be positive")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        return s


# -------------------------------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------------------------------


@dataclass
class ColourImage:
    """One RGB image in ``[0, 1]`` (float32, ``(H, W, 3)``) and what its source was."""

    name: str
    rgb: np.ndarray
    lossy: bool
    jpeg_quality: int | None = None  # the source's estimated JPEG quality, when known

    def __repr__(self) -> str:
        return f"ColourImage({self.name!r}, {self.rgb.shape}, lossy={self.lossy}, quality={self.jpeg_quality})"


def estimate_jpeg_quality(image) -> int | None:
    """IJG quality (1-100) whose scaled standard luminance table best matches a Pillow JPEG's, or ``None``."""
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables:
        return None
    ratio = float(np.mean(np.asarray(tables[0], dtype=np.float64)) / _IJG_LUMINANCE.mean()) * 100  # IJG "scale"
    quality = (200 - ratio) / 2 if ratio <= 100 else 5000 / ratio
    return int(np.clip(round(quality), 1, 100))


def _dicom_rgb_frames(path: Path) -> tuple[list[np.ndarray], bool]:
    import pydicom
    from pydicom.pixels import apply_color_lut, convert_color_space

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "RGB")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric.startswith("YBR") and not photometric.endswith("ICT") and not photometric.endswith("RCT"):
        # pydicom leaves YBR_FULL(_422) data in YCbCr; ICT/RCT (JPEG 2000) come back as RGB already.
        pixels = convert_color_space(pixels, photometric, "RGB")
    elif photometric.startswith("MONOCHROME"):
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if frames == 1:
        pixels = pixels[None]
    bits = int(ds.get("BitsStored", 8) or 8)
    peak = float(2 ** (16 if photometric == "PALETTE COLOR" else bits) - 1)
    out = [np.clip(f.astype(np.float32) / peak, 0, 1) for f in pixels]
    lossy = str(ds.get("LossyImageCompression", "00")) == "01"
    return out, lossy


def read_colour_images(path: str | Path) -> list[ColourImage]:
    """The RGB images of a file or folder (DICOM files and JPEG/PNG exports; a multi-frame DICOM gives one image
    per frame), sorted by name."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    images: list[ColourImage] = []
    for f in files:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(f) as im:
                quality = estimate_jpeg_quality(im) if im.format == "JPEG" else None
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            images.append(ColourImage(f.name, rgb, lossy=im.format == "JPEG", jpeg_quality=quality))
            continue
        try:
            frames, lossy = _dicom_rgb_frames(f)
        except Exception:
            if not p.is_dir():
                raise
            continue
        for i, frame in enumerate(frames):
            name = f.name if len(frames) == 1 else f"{f.name}#{i}"
            images.append(ColourImage(name, frame, lossy=lossy))
    return images


# -------------------------------------------------------------------------------------------------------------
# Camera model
# -------------------------------------------------------------------------------------------------------------


def to_linear(rgb: np.ndarray, gamma: str | float = "srgb") -> np.ndarray:
    """Display values in ``[0, 1]`` -> linear light (inverse sRGB transfer function, or ``x ** gamma``)."""
    x = np.clip(rgb, 0.0, 1.0)
    if gamma == "srgb":
        return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)
    return (x ** float(gamma)).astype(np.float32)


def from_linear(lin: np.ndarray, gamma: str | float = "srgb") -> np.ndarray:
    """Linear light -> display values (sRGB transfer function, or ``x ** (1 / gamma)``), clipped to ``[0, 1]``."""
    x = np.clip(lin, 0.0, 1.0)
    if gamma == "srgb":
        return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)
    return (x ** (1.0 / float(gamma))).astype(np.float32)


def _bilinear_demosaic(samples: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill each channel of ``samples`` (zeros off its Bayer sites ``mask``) by normalised bilinear interpolation."""
    from scipy.ndimage import convolve

    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
    out = np.empty_like(samples)
    for c in range(3):
        num = convolve(samples[..., c] * mask[..., c], kernel, mode="mirror")
        den = convolve(mask[..., c].astype(np.float32), kernel, mode="mirror")
        out[..., c] = np.where(mask[..., c], samples[..., c], num / np.maximum(den, 1e-6))
    return out


def bayer_mask(height: int, width: int) -> np.ndarray:
    """``(H, W, 3)`` booleans: the RGGB colour-filter site of each pixel."""
    mask = np.zeros((height, width, 3), dtype=bool)
    mask[0::2, 0::2, 0] = True
    mask[0::2, 1::2, 1] = True
    mask[1::2, 0::2, 1] = True
    mask[1::2, 1::2, 2] = True
    return mask


def sensor_noise(linear: np.ndarray, light: float, read_noise: float, rng: np.random.Generator,
                 bayer: bool = False) -> np.ndarray:
    """Zero-mean Poisson-Gaussian noise for linear-light ``linear`` (``(H, W, 3)`` in ``[0, 1]``), in the same units.

    A pixel of value ``v`` collects ``Poisson(v * light)`` electrons plus ``Normal(0, read_noise)``; divided by
    ``light`` again, its noise variance is ``v / light + (read_noise / light) ** 2``. With ``bayer`` only each
    pixel's RGGB channel is sampled and the other two are interpolated from the neighbours' noise.
    """
    electrons = np.clip(linear, 0.0, None).astype(np.float64) * light
    noise = (rng.poisson(electrons) - electrons + rng.normal(0.0, read_noise, electrons.shape)) / light
    noise = noise.astype(np.float32)
    if bayer:
        noise = _bilinear_demosaic(noise, bayer_mask(*linear.shape[:2]))
    return noise


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` in ``[0, 1]`` quantised to 8 bits, JPEG-compressed by Pillow at ``quality`` (4:2:0), decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(quantise8(rgb)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def quantise8(rgb: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def simulate_low_light(clean: np.ndarray, light: float, read_noise: float, rng: np.random.Generator, *,
                       gamma: str | float = "srgb", bayer: bool = False, jpeg_quality: int | None = None,
                       ) -> np.ndarray:
    """A low-light camera's view of the display image ``clean`` (``(H, W, 3)`` in ``[0, 1]``), in display values.

    Linear light (inverse gamma), Poisson-Gaussian noise per channel at ``light`` electrons for full-scale white
    (optionally on a Bayer mosaic), the gain back to full scale, the gamma again, 8-bit quantisation and, with
    ``jpeg_quality``, a JPEG round trip.
    """
    linear = to_linear(clean, gamma)
    noisy = from_linear(linear + sensor_noise(linear, light, read_noise, rng, bayer=bayer), gamma)
    if jpeg_quality:
        return jpeg_roundtrip(noisy, jpeg_quality)
    return quantise8(noisy).astype(np.float32) / 255.0


def jitter_colour(clean: np.ndarray, temperature: float, brightness: float, gamma: str | float = "srgb"
                  ) -> np.ndarray:
    """``clean`` with a colour-temperature (red x t, blue / t) and brightness change made in linear light."""
    gains = np.array([temperature, 1.0, 1.0 / temperature], dtype=np.float32) * brightness
    return from_linear(to_linear(clean, gamma) * gains, gamma)


# -------------------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class EndoscopyPairs(torch.utils.data.Dataset):
    """``length`` random ``(noisy, clean)`` colour patches, each ``(3, patch, patch)`` float32 in ``[0, 1]``.

    Item ``i`` is a pure function of ``(seed, i)``: the image, crop, augmentation, light level and noise are all
    drawn from ``numpy.random.default_rng([seed, i])``, so a resumed run sees the batches an uninterrupted one
    would. ``augment=False`` (validation) keeps crops, light levels and noise random but skips flips, rotations,
    colour jitter and downscaling.
    """

    def __init__(self, images: Sequence[ColourImage], patch: int, length: int, settings: EndoscopySettings,
                 seed: int, augment: bool = True) -> None:
        if not images:
            raise ValueError("no endoscopy images to train on")
        small = [im.name for im in images if min(im.rgb.shape[:2]) < patch]
        if small:
            raise ValueError(f"images smaller than the {patch} px patch: {', '.join(small)}")
        self.images = list(images)
        self.patch, self.length, self.settings = int(patch), int(length), settings
        self.seed, self.augment = int(seed), augment

    def __len__(self) -> int:
        return self.length

    def _crop(self, image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]

        def crop() -> np.ndarray:
            y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
            return image[y:y + size, x:x + size]

        best = crop()
        for _ in range(5):  # up to 6 tries: prefer crops inside the lit field (Kvasir frames have black borders)
            if float(best.mean()) > 0.06:
                break
            best = crop()
        return best

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        rng = np.random.default_rng([self.seed, int(index)])
        source = self.images[int(rng.integers(len(self.images)))]
        p = self.patch
        downscale = self.augment and rng.random() < s.downscale_probability \
            and min(source.rgb.shape[:2]) >= 2 * p
        clean = self._crop(source.rgb, 2 * p if downscale else p, rng)
        if downscale:
            clean = clean.reshape(p, 2, p, 2, 3).mean(axis=(1, 3))
        if self.augment:
            if rng.random() < 0.5:
                clean = clean[:, ::-1]
            clean = np.rot90(clean, int(rng.integers(4)))
            temperature = float(rng.uniform(s.colour_temperature_range[0], s.colour_temperature_range[1]))
            brightness = float(rng.uniform(s.brightness_range[0], s.brightness_range[1]))
            clean = jitter_colour(clean, temperature, brightness, s.gamma)
        clean = np.ascontiguousarray(clean, dtype=np.float32)
        light = _log_uniform(rng, *s.light_range)
        read = float(rng.uniform(s.read_noise_range[0], s.read_noise_range[1]))
        bayer = bool(rng.random() < s.bayer_probability)
        quality = None
        if rng.random() < (s.jpeg_probability_lossy if source.lossy else s.jpeg_probability_uncompressed):
            quality = draw_jpeg_quality(source, s, rng)
        noisy = simulate_low_light(clean, light, read, rng, gamma=s.gamma, bayer=bayer, jpeg_quality=quality)
        return (torch.from_numpy(noisy.transpose(2, 0, 1).copy()),
                torch.from_numpy(clean.transpose(2, 0, 1).copy()))


def draw_jpeg_quality(source: ColourImage, s: EndoscopySettings, rng: np.random.Generator) -> int:
    """A JPEG quality near the source's own (estimated quality -5 to +10), else from ``jpeg_quality_range``."""
    if source.jpeg_quality:
        return int(np.clip(rng.integers(source.jpeg_quality - 5, source.jpeg_quality + 11), 30, 98))
    lo, hi = s.jpeg_quality_range
    return int(rng.integers(lo, hi + 1))


def _load(cfg, names: Sequence[str]) -> list[ColourImage]:
    images: list[ColourImage] = []
    for name in names:
        found = read_colour_images(cfg.data_path(name))
        if not found:
            raise FileNotFoundError(f"no colour images in {cfg.data_path(name)}")
        images.extend(found)
    return images


def build_datasets(cfg, progress: bool = True):
    """``(train, validation | None, summary)`` for an endoscopy config: ``data.train`` / ``data.validation`` name
    image files or folders; ``[recipe]`` holds :class:`EndoscopySettings`."""
    settings = EndoscopySettings.from_table(cfg.recipe, f"{cfg.source or 'config'} [recipe]")
    train_images = _load(cfg, cfg.data.train)
    val_images = _load(cfg, cfg.data.validation) if cfg.data.validation else []
    train = EndoscopyPairs(train_images, cfg.data.patch, cfg.train.steps * cfg.data.batch, settings, cfg.seed)
    val = (EndoscopyPairs(val_images, cfg.data.patch, cfg.data.validation_patches, settings, cfg.seed + 1000,
                          augment=False) if val_images else None)
    summary = {
        "train": list(cfg.data.train), "validation": list(cfg.data.validation), "pairs": "simulated",
        "images": [im.name for im in train_images], "held_out": [im.name for im in val_images],
        "recipe": {k: v for k, v in asdict(settings).items()},
    }
    return train, val, summary


def normalization(cfg=None):
    """8-bit display values straight to ``[0, 1]`` (fixed, per channel alike: per-image scaling would shift colour)."""
    from models.folder import Normalization

    return Normalization(input_unit="modality", mode="fixed", offset=0.0, scale=255.0, clip=[0.0, 255.0],
                         invert_monochrome1=False)


def card_noise(cfg) -> dict[str, Any]:
    """The card's ``[noise]`` table: the simulation and the ranges it drew from."""
    s = EndoscopySettings.from_table(cfg.recipe, f"{cfg.source or 'config'} [recipe]")
    return {"model": "low-light Poisson-Gaussian in linear RGB, camera gamma, JPEG "
                     "(training/modalities/endoscopy.py)",
            "light_range": list(s.light_range), "read_noise_range": list(s.read_noise_range),
            "gamma": s.gamma, "jpeg_quality_range": list(s.jpeg_quality_range)}


def card_modalities(cfg=None) -> list[str]:
    """The modalities an endoscopy model's card lists."""
    return list(CARD_MODALITIES)


# -------------------------------------------------------------------------------------------------------------
# Evaluation
# -------------------------------------------------------------------------------------------------------------


def colour_shift_pct(image: np.ndarray, reference: np.ndarray) -> list[float]:
    """Per-channel mean difference ``mean(image_c) - mean(reference_c)`` in % of the range ``[0, 1]``."""
    return [float(100 * (image[..., c].mean() - reference[..., c].mean())) for c in range(3)]


def score(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM on ``[0, 1]`` (colour), and the largest absolute per-channel mean difference (%)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    shifts = colour_shift_pct(image, reference)
    return {"psnr": float(peak_signal_noise_ratio(reference, image, data_range=1.0)),
            "ssim": float(structural_similarity(reference, image, data_range=1.0, channel_axis=-1)),
            "colour_shift_pct": float(max(abs(v) for v in shifts)),
            "shift_r_pct": shifts[0], "shift_g_pct": shifts[1], "shift_b_pct": shifts[2]}


def denoise_network(network, noisy: np.ndarray) -> np.ndarray:
    """Run the colour network on ``(H, W, 3)`` in ``[0, 1]``; returns the same shape, clipped to ``[0, 1]``."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(noisy.transpose(2, 0, 1)))[None].float()
        y = network(x)[0].numpy().transpose(1, 2, 0)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def cbm3d(noisy: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """CBM3D (``bm3d.bm3d_rgb``, opponent colour space) with per-channel white-noise SDs ``sigma``."""
    import bm3d

    return np.clip(bm3d.bm3d_rgb(noisy.astype(np.float64), list(map(float, sigma))), 0, 1).astype(np.float32)


def colour_nlm(noisy: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """scikit-image's colour non-local means (``channel_axis=-1``), ``h = 0.8 sigma`` (its documented choice)."""
    from skimage.restoration import denoise_nl_means

    s = float(np.mean(sigma))
    return np.clip(denoise_nl_means(noisy, h=0.8 * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6,
                                    channel_axis=-1), 0, 1).astype(np.float32)


def _centre_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return rgb
    h, w = rgb.shape[:2]
    ch, cw = min(size, h), min(size, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return rgb[y:y + ch, x:x + cw]


def _settings_of(card) -> EndoscopySettings:
    recipe = dict(card.training.get("recipe", {})) if isinstance(card.training, dict) else {}
    try:
        return EndoscopySettings.from_table(recipe, f"{card.name} card [training.recipe]")
    except (TypeError, ValueError):
        return EndoscopySettings()


def evaluate(model_dir: str | Path, data: Sequence[str], out_dir: str | Path, *, seed: int = 1234,
             max_images: int = 6, progress: Callable[[str], None] = _quiet, write_card: bool = False,
             baselines: Sequence[str] = ("cbm3d", "nlm")) -> dict[str, Any]:
    """Score an endoscopy model folder on the held-out images ``data`` (files or folders) at the card's evaluation
    light levels, beside CBM3D and colour non-local means (oracle per-channel SD).

    Writes ``metrics.json``, ``table.md`` and ``figure-<image>.png`` (noisy / CBM3D / model / clean at the middle
    light level, first image) into ``out_dir``; ``write_card`` stores a summary in the model's card (same
    weights). Returns the metrics.
    """
    from models.folder import load_model_folder, update_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model_folder(model_dir, "cpu")
    network, card = loaded.network.eval(), loaded.card
    s = _settings_of(card)
    images = [im for path in data for im in read_colour_images(path)][: max(1, max_images)]
    if not images:
        raise ValueError(f"no colour images in {', '.join(map(str, data))}")
    rows: list[dict[str, Any]] = []
    figure_done = False
    for i, image in enumerate(images):
        clean = _centre_crop(image.rgb, s.evaluate_crop)
        quality = (image.jpeg_quality or s.evaluate_jpeg_quality) if image.lossy else None
        for j, light in enumerate(s.evaluate_light_levels):
            rng = np.random.default_rng([seed, i, j])
            noisy = simulate_low_light(clean, light, s.evaluate_read_noise, rng, gamma=s.gamma, jpeg_quality=quality)
            sigma = [float(np.std(noisy[..., c] - clean[..., c])) for c in range(3)]  # oracle, per channel
            started = time.monotonic()
            outputs = {"input": noisy, "model": denoise_network(network, noisy)}
            seconds = {"model": time.monotonic() - started}
            for name in baselines:
                started = time.monotonic()
                outputs[name] = (cbm3d if name == "cbm3d" else colour_nlm)(noisy, sigma)
                seconds[name] = time.monotonic() - started
            for method, result in outputs.items():
                rows.append({"image": image.name, "light": light, "jpeg_quality": quality, "method": method,
                             "sigma_oracle": [round(v, 5) for v in sigma], **score(result, clean),
                             "seconds": round(seconds.get(method, 0.0), 2)})
            progress(f"{image.name} light {light:g} e-: " + ", ".join(
                f"{m} {r['psnr']:.2f} dB" for m, r in ((r["method"], r) for r in rows[-len(outputs):])))
            if not figure_done and j == len(s.evaluate_light_levels) // 2:
                _figure(out / f"figure-{Path(image.name).stem}.png", noisy, outputs, clean, light, image.name)
                figure_done = True
    metrics = _summarise(card.name, rows, s, baselines, seed, [im.name for im in images])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "table.md").write_text(_table(metrics))
    if write_card:
        card.metrics = card_metrics(metrics)
        update_card(card, model_dir)
    return metrics


def _summarise(model: str, rows: list[dict[str, Any]], s: EndoscopySettings, baselines: Sequence[str], seed: int,
               images: list[str]) -> dict[str, Any]:
    by_light: dict[str, Any] = {}
    for light in s.evaluate_light_levels:
        here = [r for r in rows if r["light"] == light]
        entry: dict[str, Any] = {}
        for method in ("input", "model", *baselines):
            mine = [r for r in here if r["method"] == method]
            entry[method] = {k: float(np.mean([r[k] for r in mine])) for k in ("psnr", "ssim")}
            entry[method]["colour_shift_pct_max"] = float(max(r["colour_shift_pct"] for r in mine))
        for b in baselines:
            entry[f"model_minus_{b}_db"] = entry["model"]["psnr"] - entry[b]["psnr"]
        by_light[f"{light:g}"] = entry
    return {"model": model, "modality": "endoscopy", "images": images, "seed": seed,
            "noise": {"light_levels_electrons_at_white": list(s.evaluate_light_levels),
                      "read_noise_electrons": s.evaluate_read_noise, "gamma": s.gamma, "bayer": False,
                      "crop": s.evaluate_crop, "jpeg": "lossy sources at their own estimated quality"},
            "baselines": list(baselines), "baseline_sigma": "oracle: SD of noisy - clean per channel",
            "by_light": by_light, "rows": rows}


def _table(metrics: dict[str, Any]) -> str:
    lines = ["| image | light (e- at white) | method | psnr | ssim | colour shift % (max abs over R,G,B) |",
             "|---|---|---|---|---|---|"]
    for r in metrics["rows"]:
        lines.append(f"| {r['image']} | {r['light']:g} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['colour_shift_pct']:.3f} |")
    lines += ["", "| light | input psnr | model psnr | " + " | ".join(f"{b} psnr" for b in metrics["baselines"])
              + " | " + " | ".join(f"model - {b} (dB)" for b in metrics["baselines"])
              + " | model ssim | model colour shift % (worst image) |",
              "|---" * (4 + 2 * len(metrics["baselines"]) + 1) + "|"]
    for light, e in metrics["by_light"].items():
        lines.append(f"| {light} | {e['input']['psnr']:.2f} | {e['model']['psnr']:.2f} | "
                     + " | ".join(f"{e[b]['psnr']:.2f}" for b in metrics["baselines"]) + " | "
                     + " | ".join(f"{e[f'model_minus_{b}_db']:+.2f}" for b in metrics["baselines"])
                     + f" | {e['model']['ssim']:.4f} | {e['model']['colour_shift_pct_max']:.3f} |")
    return "\n".join(lines) + "\n"


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A compact summary for ``card.toml``: per light level, mean PSNR/SSIM per method and the worst colour shift."""
    out: dict[str, Any] = {"images": metrics["images"], "baseline_sigma": metrics["baseline_sigma"],
                           "read_noise_electrons": metrics["noise"]["read_noise_electrons"],
                           "crop": metrics["noise"]["crop"]}
    for light, e in metrics["by_light"].items():
        entry: dict[str, float] = {}
        for method, row in e.items():
            if isinstance(row, dict):
                for k, v in row.items():
                    entry[f"{method}_{k}"] = round(v, 4)
            else:
                entry[method] = round(row, 3)
        out[f"light_{light}"] = entry
    return out


def _figure(path: Path, noisy: np.ndarray, outputs: dict[str, np.ndarray], clean: np.ndarray, light: float,
            name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("noisy", noisy), *[(m, outputs[m]) for m in ("cbm3d", "nlm") if m in outputs],
              ("model", outputs["model"]), ("clean", clean)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, img) in zip(axes, panels):
        extra = f"\n{score(img, clean)['psnr']:.2f} dB" if title != "clean" else ""
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(f"{title}{extra}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{name}, {light:g} e- at white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
