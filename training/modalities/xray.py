"""X-ray recipe (CR, DX, XA): detector Poisson-Gaussian noise with its spatial correlation, and 2D-image tools.

Images
    DICOM radiographs are read as *raw* images: their stored values through the Modality LUT (rescale), before any
    display transform (VOI LUT, window). MONOCHROME1 images are inverted (``high - value`` over the stored range,
    as the node does under the card's ``invert_monochrome1``), so "bright = more signal" for the network and for
    the noise model. PNG exports (the NIH chest radiographs) are already *processed* (windowed, 8-bit): their
    values are taken as they are, and the noise is simulated on them as if the processing were linear (the
    processing cannot be undone without its parameters; documented in ``training/README.md``).

Noise (:func:`poisson_gaussian`), in units of the image's normalisation scale (``p99.5 - p0.5`` of the clean
image, offset ``p0.5``), so one set of parameters fits a 10-bit CR and an 8-bit PNG alike:

    ``s = max(clean_norm, 0)``;  ``noisy_norm = gain * Poisson(s / gain) + N(0, electronic_sd^2)``

so ``Var = gain * s + electronic_sd^2`` per pixel; the noise (``noisy - clean``) is then blurred by a Gaussian of
``correlation`` pixels (the detector's MTF spreads each quantum over neighbouring pixels), renormalised to keep
its variance, and the result is rounded to integers (stored values are integers) and clipped to the image's
range.

Split: by image, each image its own patient (the NIH file names are ``<patient>_<follow-up>``, one image per
patient here; the three DICOM files are three patients). A stable hash of the patient id puts it in train,
validation or test (:func:`assign_split`); ``[recipe] test`` / ``train`` name files that go to one part whatever
the hash says (the DICOM files, too few for a hash).

Evaluation (:func:`evaluate`): held-out images at the noise levels of :data:`EVAL_LEVELS`, scored against the
clean image (PSNR with the clean image's ``p0.5..p99.5`` range as the data range, SSIM likewise) for the noisy
input, the model (as the node runs it: percentiles of the *noisy* image, overlapping tiles above 1024 px),
non-local means (scikit-image, sigma = the true SD of the added noise: an oracle that favours it) on the whole
image, and BM3D on a 256 px centre crop (oracle noise power spectrum, measured on the true added noise, so it
knows the correlation; white-noise BM3D leaves the correlated noise as blotches), where every method is scored
again.

The generic pieces (:class:`Image2D`, :class:`PatchPairs`, :func:`run_model`, PSNR/SSIM, figures) are shared with
:mod:`training.modalities.ultrasound`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Noise levels scored by :func:`evaluate`: name -> (gain, electronic_sd, correlation px), normalised units.
EVAL_LEVELS: dict[str, tuple[float, float, float]] = {
    "moderate": (1e-3, 0.005, 0.7),
    "strong": (4e-3, 0.01, 0.7),
}
#: ``[recipe]`` keys this module reads, with their defaults.
RECIPE_DEFAULTS: dict[str, Any] = {
    "gain_range": [2e-4, 8e-3],  # log-uniform, normalised units
    "electronic_range": [0.002, 0.02],  # uniform
    "correlation_range": [0.0, 1.0],  # Gaussian sigma of the noise blur, pixels
    "validation_fraction": 0.1,
    "test_fraction": 0.2,
    "train": [],  # file names forced into the training part
    "test": [],  # file names forced into the test part
    "modalities": ["CR", "DX", "XA"],  # what the card lists
    # Fraction of training patches in which one side of a random edge is set to the image's lowest (three times in
    # four) or highest stored value before the noise: collimator and image-intensifier surrounds, burnt-out skin
    # lines. The detector clips there, so the noise is one-sided and small; 2.0, trained without, added error.
    "clipped_probability": 0.0,
}
#: Pixels whose blurred noise is computed beyond each patch edge (the blur's support).
MARGIN = 4


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Image2D:
    """One grey image in physical units (bright = more signal), with where it came from.

    Attributes
    ----------
    name
        File name (unique within a data set).
    pixels
        ``(H, W)`` float32: stored values through the rescale, MONOCHROME1 inverted; PNG values as they are.
    subject
        Patient / subject id used for the split.
    value_range
        ``(low, high)`` of the physical values the format can hold (clipping range of the noisy image).
    processed
        ``True`` for display-processed exports (PNG), ``False`` for raw DICOM stored values.
    inverted
        The stored image was MONOCHROME1 and has been inverted.
    mask
        ``(H, W)`` bool of pixels that belong to the image proper (``None``: all); patches and scores use only
        these (ultrasound: the grey B-mode pixels).
    """

    name: str
    pixels: np.ndarray
    subject: str
    value_range: tuple[float, float]
    processed: bool
    inverted: bool = False
    mask: np.ndarray | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self) -> tuple[float, float]:
        """``(offset, scale)`` of the per-image normalisation (0.5 / 99.5 percentiles of the valid pixels)."""
        return percentile_params(self.pixels, self.mask)


def percentile_params(pixels: np.ndarray, mask: np.ndarray | None = None,
                      percentiles: Sequence[float] = (0.5, 99.5)) -> tuple[float, float]:
    """``(p_low, p_high - p_low)`` over ``pixels`` (where ``mask``), as the node's per-image normalisation."""
    valid = pixels if mask is None else pixels[mask]
    lo, hi = np.percentile(valid, list(percentiles)) if valid.size else (0.0, 1.0)
    return float(lo), float(max(hi - lo, 1e-6))


def read_png_grey(path: str | Path) -> np.ndarray:
    """A PNG/JPEG as float32 grey values (colour files: ITU-R 601 luma, Pillow's ``L``)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I"):
            return np.asarray(im, dtype=np.float32)
        return np.asarray(im.convert("L"), dtype=np.float32)


def read_dicom_grey(path: str | Path) -> Image2D:
    """A single-frame grey DICOM image as raw physical values (rescale applied, MONOCHROME1 inverted)."""
    import pydicom

    ds = pydicom.dcmread(path)
    photometric = str(ds.PhotometricInterpretation)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: {photometric} is not a grey image")
    stored = np.asarray(ds.pixel_array, dtype=np.float64)
    if stored.ndim != 2:
        stored = stored.reshape(-1, *stored.shape[-2:])[0]  # first frame
    bits = int(ds.BitsStored)
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    physical = stored * slope + intercept
    p_lo, p_hi = sorted((lo * slope + intercept, hi * slope + intercept))
    inverted = photometric == "MONOCHROME1"
    if inverted:  # the node's v -> lo + hi - v over the physical range
        physical = p_lo + p_hi - physical
    return Image2D(name=Path(path).name, pixels=physical.astype(np.float32),
                   subject=str(getattr(ds, "PatientID", "") or Path(path).stem), value_range=(p_lo, p_hi),
                   processed=False, inverted=inverted, source=str(path),
                   extra={"modality": str(getattr(ds, "Modality", "")), "bits_stored": bits})


def xray_subject(name: str) -> str:
    """Patient id of an X-ray file name (NIH ``00000075_000.png`` -> ``00000075``; others: the stem)."""
    stem = Path(name).stem
    head = stem.split("_")[0]
    return head if head.isdigit() else stem


def read_xray_images(paths: Sequence[str | Path]) -> list[Image2D]:
    """X-ray images from files and folders: PNG/JPEG (processed, 8-bit) and grey DICOM (raw stored values)."""
    out: list[Image2D] = []
    for path in _expand(paths):
        if path.suffix.lower() in PNG_SUFFIXES:
            pixels = read_png_grey(path)
            top = 65535.0 if pixels.max() > 255 else 255.0
            out.append(Image2D(name=path.name, pixels=pixels, subject=xray_subject(path.name),
                               value_range=(0.0, top), processed=True, source=str(path)))
        else:
            try:
                out.append(read_dicom_grey(path))
            except Exception as exc:  # not DICOM, or not grey
                LOGGER.info("skipping %s: %s", path, exc)
    return out


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() not in (".csv", ".md")))
        elif p.is_file():
            files.append(p)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------------


def assign_split(subject: str, validation_fraction: float, test_fraction: float) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for a subject id, from a stable hash (same on every machine)."""
    u = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 16**8
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_images(images: Sequence[Image2D], recipe: dict[str, Any]) -> dict[str, list[Image2D]]:
    """Images by part (``train``, ``validation``, ``test``), whole subjects only; ``recipe`` forces named files."""
    parts: dict[str, list[Image2D]] = {"train": [], "validation": [], "test": []}
    forced = {n: part for part in ("train", "test") for n in recipe.get(part, [])}
    by_subject: dict[str, str] = {}
    for im in images:
        if im.name in forced:
            by_subject[im.subject] = forced[im.name]
    for im in images:
        part = by_subject.get(im.subject) or assign_split(im.subject, float(recipe["validation_fraction"]),
                                                          float(recipe["test_fraction"]))
        parts[part].append(im)
    return parts


def recipe_settings(cfg_recipe: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``[recipe]`` table with defaults filled in; unknown keys are an error naming them."""
    from training.config import TrainingConfigError

    unknown = sorted(set(cfg_recipe) - set(defaults) - {"data"})
    if unknown:
        raise TrainingConfigError(f"{where} [recipe]: unknown key(s) {', '.join(unknown)} "
                                  f"(known: data, {', '.join(defaults)})")
    return {**defaults, **cfg_recipe}


# ---------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------


def correlate(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Blur ``noise`` with a Gaussian of ``sigma`` pixels and rescale so white noise keeps its variance."""
    if sigma <= 0.05:
        return noise
    from scipy import ndimage

    delta = np.zeros((2 * MARGIN + 1,) * 2)
    delta[MARGIN, MARGIN] = 1.0
    energy = float((ndimage.gaussian_filter(delta, sigma, mode="constant", truncate=MARGIN / sigma) ** 2).sum())
    return ndimage.gaussian_filter(noise, sigma, mode="reflect", truncate=MARGIN / sigma) / math.sqrt(energy)


def poisson_gaussian(clean_norm: np.ndarray, gain: float, electronic_sd: float, correlation: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Detector noise on a normalised image: ``gain * Poisson(s / gain) + N(0, sd^2)``, then correlated.

    Parameters
    ----------
    clean_norm
        The clean image in normalised units (signal ``s = max(clean_norm, 0)``).
    gain
        Signal units per quantum: the Poisson part's variance is ``gain * s``.
    electronic_sd
        SD of the signal-independent (electronic) part.
    correlation
        Sigma in pixels of the Gaussian that spreads the noise (0: white).

    Returns
    -------
    The noisy normalised image (float64); its noise before the blur has variance ``gain * s + sd^2``.
    """
    s = np.maximum(clean_norm.astype(np.float64), 0.0)
    noisy = gain * rng.poisson(s / gain) + rng.normal(0.0, electronic_sd, s.shape)
    return clean_norm + correlate(noisy - s, correlation)


def xray_noisy(image: Image2D, clean: np.ndarray, params: tuple[float, float], gain: float, electronic_sd: float,
               correlation: float, rng: np.random.Generator) -> np.ndarray:
    """A noisy version of ``clean`` (a region of ``image``, physical units): rounded, clipped to the range."""
    offset, scale = params
    noisy = poisson_gaussian((clean - offset) / scale, gain, electronic_sd, correlation, rng) * scale + offset
    lo, hi = image.value_range
    return np.clip(np.rint(noisy), lo, hi).astype(np.float32)


def draw_xray_level(recipe: dict[str, Any], rng: np.random.Generator) -> tuple[float, float, float]:
    """``(gain, electronic_sd, correlation)`` drawn from the recipe's ranges (gain log-uniform)."""
    g0, g1 = recipe["gain_range"]
    gain = float(math.exp(rng.uniform(math.log(g0), math.log(g1))))
    sd = float(rng.uniform(*recipe["electronic_range"]))
    corr = float(rng.uniform(*recipe["correlation_range"]))
    return gain, sd, corr


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


NoiseFn = Callable[[Image2D, np.ndarray, tuple[float, float], np.random.Generator], np.ndarray]


class PatchPairs(torch.utils.data.Dataset):
    """``(noisy, clean)`` patches of 2D images, noise simulated on the fly; item ``i`` is a function of ``(seed, i)``.

    Images are drawn in proportion to the square root of their valid area (a 2140x1760 CR does not drown the
    1024x1024 PNGs); patch centres fall on the object (pixels above the image's 5th percentile, within its mask)
    nine times in ten. Both tensors are normalised with the clean image's percentiles (the node uses the input's;
    the difference is a fraction of the noise SD) and get the same random flip and rotation.
    """

    def __init__(self, images: Sequence[Image2D], noise: NoiseFn, patch: int, length: int, seed: int,
                 augment: bool = True, margin: int = MARGIN, clipped_probability: float = 0.0) -> None:
        if not images:
            raise ValueError("no images to cut patches from")
        self.images = list(images)
        self.margin = int(margin)  # pixels of context the noise needs beyond each patch edge (its correlation)
        self.noise = noise
        self.patch, self.length, self.seed, self.augment = int(patch), int(length), int(seed), augment
        self.clipped_probability = float(clipped_probability)
        self.params = [im.params() for im in self.images]
        area = np.array([float(im.mask.sum()) if im.mask is not None else im.pixels.size for im in self.images])
        self.weights = np.sqrt(area) / np.sqrt(area).sum()
        self.centres = []
        for im in self.images:
            ok = im.pixels > np.percentile(im.pixels if im.mask is None else im.pixels[im.mask], 5)
            if im.mask is not None:
                ok &= im.mask
            ys, xs = np.nonzero(ok)
            self.centres.append((ys, xs))

    def __len__(self) -> int:
        return self.length

    def _origin(self, k: int, rng: np.random.Generator) -> tuple[int, int]:
        im, p, m = self.images[k], self.patch, self.margin
        h, w = im.pixels.shape
        ys, xs = self.centres[k]
        if len(ys) and rng.random() < 0.9:
            j = int(rng.integers(len(ys)))
            y, x = int(ys[j]) - p // 2, int(xs[j]) - p // 2
        else:
            y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        return int(np.clip(y, m, h - p - m)), int(np.clip(x, m, w - p - m))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from training.data import augment

        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.choice(len(self.images), p=self.weights))
        im, p, m = self.images[k], self.patch, self.margin
        y, x = self._origin(k, rng)
        clean = im.pixels[y - m:y + p + m, x - m:x + p + m]
        if self.clipped_probability > 0.0 and rng.random() < self.clipped_probability:
            lo, hi = im.value_range
            clean = clipped_region(clean, lo if rng.random() < 0.75 else hi, rng)
        noisy = self.noise(im, clean, self.params[k], rng)[m:m + p, m:m + p]
        clean = clean[m:m + p, m:m + p]
        offset, scale = self.params[k]
        a = torch.from_numpy(((noisy - offset) / scale).astype(np.float32))[None]
        b = torch.from_numpy(((clean - offset) / scale).astype(np.float32))[None]
        if self.augment:
            a, b = augment((a, b), rng)
        return a, b


def clipped_region(clean: np.ndarray, value: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``clean`` with the far side of a random straight edge (or, one time in three, the outside of a
    circle, as an image intensifier's round field) set to ``value``, covering about 15-70 % of the patch."""
    h, w = clean.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 1 / 3:
        cy, cx = rng.uniform(-0.5, 1.5) * h, rng.uniform(-0.5, 1.5) * w
        distances = np.hypot(yy - cy, xx - cx)
        outside = distances > np.quantile(distances, rng.uniform(0.3, 0.85))
    else:
        angle = rng.uniform(0.0, 2 * math.pi)
        along = (yy - h / 2) * math.cos(angle) + (xx - w / 2) * math.sin(angle)
        outside = along > np.quantile(along, rng.uniform(0.3, 0.85))
    out = clean.astype(np.float32, copy=True)
    out[outside] = value
    return out


def fixed_validation(dataset: PatchPairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation patches, computed once (validation re-reads them every ``validate_every`` steps)."""
    return [dataset[i] for i in range(len(dataset))]


def build_datasets(cfg, progress: bool = True):
    """X-ray training and validation patches (see the module docstring); ``[recipe] data`` lists files/folders."""
    recipe = recipe_settings(cfg.recipe, RECIPE_DEFAULTS, cfg.source or "config")
    p = recipe["clipped_probability"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        from training.config import TrainingConfigError

        raise TrainingConfigError(f"{cfg.source or 'config'} [recipe]: clipped_probability must be a number in "
                                  f"[0, 1], got {p!r}")
    images = read_xray_images([cfg.data_path(p) for p in recipe.get("data", [])])
    parts = split_images(images, recipe)
    if not parts["train"]:
        raise FileNotFoundError("no X-ray training images (check [recipe] data)")
    d = cfg.data

    def noise(im: Image2D, clean: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
        return xray_noisy(im, clean, params, *draw_xray_level(recipe, rng), rng)

    train = PatchPairs(parts["train"], noise, d.patch, cfg.train.steps * d.batch, cfg.seed,
                       clipped_probability=float(recipe["clipped_probability"]))
    val = None
    if parts["validation"]:
        val = fixed_validation(PatchPairs(parts["validation"], noise, d.patch, d.validation_patches,
                                          cfg.seed + 1000, augment=False))
    summary = split_summary(parts)
    if progress:
        LOGGER.info("x-ray images: %s", {k: len(v) for k, v in parts.items()})
    return train, val, summary


def card_modalities(cfg) -> list[str]:
    """The DICOM modalities an X-ray model's card lists (``[recipe] modalities``, default CR, DX, XA)."""
    return list(recipe_settings(cfg.recipe, RECIPE_DEFAULTS, cfg.source or "config")["modalities"])


def card_noise(cfg) -> dict[str, Any]:
    """The card's ``[noise]`` table: the simulation and the ranges it drew from."""
    settings = recipe_settings(cfg.recipe, RECIPE_DEFAULTS, cfg.source or "config")
    return {"model": "poisson-gaussian, correlated (training/modalities/xray.py)",
            **{k: settings[k] for k in ("gain_range", "electronic_range", "correlation_range")}}


def split_summary(parts: dict[str, list[Image2D]]) -> dict[str, Any]:
    """What the card's ``[training]`` table says about the data: the image names of each part."""
    return {"split": "by patient (stable hash of the patient id; see training/modalities)",
            "train_images": [im.name for im in parts["train"]],
            "validation_images": [im.name for im in parts["validation"]],
            "test_images": [im.name for im in parts["test"]]}


# ---------------------------------------------------------------------------------------------------------------
# Running a model as the node does
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_model(network: torch.nn.Module, card, image: np.ndarray, mask: np.ndarray | None = None,
              strength: float = 1.0, tile: int = 1024) -> np.ndarray:
    """Denoise one physical grey image as the node does: per-image percentiles of the (noisy) input, overlapping
    tiles above ``tile`` pixels a side, output = input + strength * residual; pixels outside ``mask`` unchanged."""
    from dicom_node.denoise.engine import tiled_apply
    from models.networks import receptive_radius, size_multiple

    offset, scale = percentile_params(image, mask, card.normalization.percentiles)
    x = (image - offset) / scale
    if mask is not None:
        x = np.where(mask, x, 0.0)
    t = torch.from_numpy(x.astype(np.float32))[None, None]
    y = tiled_apply(network, t, tile=tile, halo=min(receptive_radius(network), 128), blend=32,
                    multiple=size_multiple(network))
    out = image + strength * (y - t)[0, 0].numpy() * scale
    if mask is not None:
        out = np.where(mask, out, image)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Scores, baselines, figures
# ---------------------------------------------------------------------------------------------------------------


def scores(image: np.ndarray, clean: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> dict:
    """PSNR (dB) and SSIM of ``image`` against ``clean`` with a fixed ``data_range`` (over ``mask`` when given)."""
    from skimage.metrics import structural_similarity

    diff = (image.astype(np.float64) - clean)[mask] if mask is not None else image.astype(np.float64) - clean
    mse = float(np.mean(diff**2))
    psnr = 10 * math.log10(data_range**2 / max(mse, 1e-12))
    _, smap = structural_similarity(clean.astype(np.float64), image.astype(np.float64), data_range=data_range,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    ssim = float(smap[mask].mean() if mask is not None else smap.mean())
    return {"psnr": round(psnr, 3), "ssim": round(ssim, 4)}


def cached(cache_dir: Path | None, key: str, compute: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    """``compute(*args)`` stored under ``cache_dir`` by ``key`` (baselines are slow on this CPU)."""
    if cache_dir is None:
        return compute(*args)
    path = cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")
    if path.exists():
        return np.load(path)
    out = compute(*args)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def nlm(image: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image non-local means, its recommended ``h = 0.8 sigma`` for ``fast_mode`` (5x5 patches, 13x13 search)."""
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(image.astype(np.float64), h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5,
                            patch_distance=6).astype(np.float32)


def bm3d_white(image: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (``bm3d`` package) with a white-noise ``sigma``."""
    import bm3d

    return bm3d.bm3d(image.astype(np.float64), sigma_psd=float(sigma)).astype(np.float32)


def oracle_psd(noise: np.ndarray, smooth_bins: float = 2.0) -> np.ndarray:
    """The noise power spectrum ``bm3d`` takes (``E|FFT(noise)|^2``, unshifted), estimated from the true added noise
    and smoothed over ``smooth_bins`` frequency bins: an oracle that tells BM3D the noise's correlation too."""
    from scipy import ndimage

    power = np.abs(np.fft.fft2(noise.astype(np.float64) - noise.mean())) ** 2
    return ndimage.gaussian_filter(power, smooth_bins, mode="wrap")


def bm3d_coloured(image: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """BM3D (``bm3d`` package) given the noise's power spectrum (:func:`oracle_psd` of the true added noise):
    correlated noise is what a white-noise BM3D leaves behind as blotches."""
    import bm3d

    if not hasattr(np, "trapz"):  # bm4d (under bm3d's coloured-noise path) still calls np.trapz, gone in NumPy 2
        np.trapz = np.trapezoid  # type: ignore[attr-defined]  # NumPy 2 stubs lack the removed np.trapz
    return bm3d.bm3d(image.astype(np.float64), sigma_psd=oracle_psd(noise)).astype(np.float32)


def centre_crop(shape: tuple[int, int], size: int, mask: np.ndarray | None = None) -> tuple[slice, slice]:
    """A ``size`` square at the centre of the object (centre of mass of ``mask``) or of the image."""
    h, w = shape
    if mask is not None and mask.any():
        ys, xs = np.nonzero(mask)
        cy, cx = int(ys.mean()), int(xs.mean())
    else:
        cy, cx = h // 2, w // 2
    s = min(size, h, w)
    y0, x0 = int(np.clip(cy - s // 2, 0, h - s)), int(np.clip(cx - s // 2, 0, w - s))
    return slice(y0, y0 + s), slice(x0, x0 + s)


def save_panels(path: Path, title: str, panels: dict[str, np.ndarray], window: tuple[float, float]) -> None:
    """One row of grey panels (same window) plus the model's error; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    for ax, (label, img) in zip(np.atleast_1d(axes), panels.items()):
        if label.startswith("|"):
            ax.imshow(img, cmap="magma", vmin=0, vmax=max(float(np.percentile(img, 99.5)), 1e-6))
        else:
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1])
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out(images: Sequence[Image2D], card, explicit: set[str]) -> list[Image2D]:
    """The images to score: those the card lists as test images, plus files named on the command line; an image
    the model trained on is never scored (it would flatter the model)."""
    train = set(card.training.get("train_images", [])) | set(card.training.get("validation_images", []))
    test = set(card.training.get("test_images", []))
    out = []
    for im in images:
        if im.name in train:
            LOGGER.warning("not scoring %s: the model was trained (or validated) on it", im.name)
        elif im.name in test or im.name in explicit or not test:
            out.append(im)
    return out


def scoring_setup(model_dir: str | Path, data: Sequence[str], out_dir: str | Path,
                  read_images: Callable[[Sequence[str]], list[Image2D]], max_images: int, what: str
                  ) -> tuple[torch.nn.Module, Any, Path, list[Image2D]]:
    """What an X-ray or ultrasound evaluation starts from: the network and card, the report folder (made), and up
    to ``max_images`` held-out images (:func:`held_out`) spread evenly by name; ``ValueError`` when there are none.
    """
    from models.folder import load_model_folder

    loaded = load_model_folder(model_dir, "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explicit = {Path(p).name for p in data if Path(p).is_file()}
    images = evenly(sorted(held_out(read_images(data), loaded.card, explicit), key=lambda i: i.name), max_images)
    if not images:
        raise ValueError(f"no held-out {what} images in {list(data)}")
    return loaded.network, loaded.card, out, images


def evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (all when ``k`` <= 0 or there are fewer)."""
    if k <= 0 or k >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


@dataclass
class Scored:
    """Rows of one image at one noise level: method -> scores, for the whole image and the crop."""

    image: str
    level: str
    rows: dict[str, dict[str, float]]
    crop_rows: dict[str, dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)


def write_report(out: Path, model: str, scored: list[Scored], settings: dict[str, Any],
                 crop_methods: list[str]) -> dict[str, Any]:
    """``metrics.json`` and ``table.md`` (per image and level, then the mean per level and method)."""
    lines = ["| image | level | region | " + " | ".join(f"{m} psnr / ssim" for m in crop_methods) + " |",
             "|---|---|---|" + "---|" * len(crop_methods)]
    for s in scored:
        for region, rows in (("whole", s.rows), ("crop", s.crop_rows)):
            cells = [f"{rows[m]['psnr']:.2f} / {rows[m]['ssim']:.4f}" if m in rows else "" for m in crop_methods]
            lines.append(f"| {s.image} | {s.level} | {region} | " + " | ".join(cells) + " |")
    summary: dict[str, Any] = {}
    lines += ["", "Mean over the images (PSNR dB / SSIM):", "",
              "| level | region | " + " | ".join(crop_methods) + " | model - best baseline (dB) |",
              "|---|---|" + "---|" * (len(crop_methods) + 1)]
    for level in dict.fromkeys(s.level for s in scored):
        for region, attr in (("whole", "rows"), ("crop", "crop_rows")):
            mean = {}
            for m in crop_methods:
                vals = [getattr(s, attr)[m] for s in scored if s.level == level and m in getattr(s, attr)]
                if vals:
                    mean[m] = {k: round(float(np.mean([v[k] for v in vals])), 4) for k in ("psnr", "ssim")}
            baselines = [m for m in mean if m != "input" and not m.startswith("model")]
            margin = (mean["model"]["psnr"] - max(mean[b]["psnr"] for b in baselines)) if baselines else float("nan")
            summary[f"{level}-{region}"] = {**{f"{m}_{k}": v for m, r in mean.items() for k, v in r.items()},
                                            "model_minus_best_baseline_db": round(margin, 3)}
            cells = [f"{mean[m]['psnr']:.2f} / {mean[m]['ssim']:.4f}" if m in mean else "" for m in crop_methods]
            lines.append(f"| {level} | {region} | " + " | ".join(cells) + f" | {margin:+.2f} |")
    metrics = {"model": model, **settings, "summary": summary,
               "images": [{"image": s.image, "level": s.level, "rows": s.rows, "crop_rows": s.crop_rows,
                           **s.extra} for s in scored]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return metrics


def store_card_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Write the per-level means (and the settings) into the model's card; the weights are unchanged."""
    from models.folder import read_card, update_card

    card = read_card(model_dir)
    card.metrics = {k: v for k, v in metrics.items() if k not in ("images", "model", "summary")}
    card.metrics.update({k.replace(".", "_"): v for k, v in metrics["summary"].items()})
    update_card(card, model_dir)


def _quiet(_message: str) -> None:
    pass


def evaluate(model_dir: str | Path, data: Sequence[str], out_dir: str | Path, *, seed: int = 1234,
             max_images: int = 6, progress: Callable[[str], None] = _quiet, write_card: bool = False,
             crop: int = 256, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Score an X-ray model on held-out images (see the module docstring); writes metrics.json, table.md, figures.

    Parameters
    ----------
    model_dir
        The model folder (its card lists the images it was trained on; those are never scored).
    data
        Files and folders of X-ray images; from folders only the card's test images are scored.
    max_images
        Images scored, evenly spread over the held-out ones in name order (0: all).
    crop
        Side of the centre crop on which BM3D runs (and every method is scored again).
    """
    network, card, out, images = scoring_setup(model_dir, data, out_dir, read_xray_images, max_images, "X-ray")
    cache = Path(cache_dir) if cache_dir else None
    scored: list[Scored] = []
    for n, im in enumerate(images, 1):
        lo, hi = np.percentile(im.pixels, [0.5, 99.5])
        data_range = float(hi - lo)
        params = im.params()
        box = centre_crop(im.pixels.shape, crop)
        for li, (level, (gain, sd, corr)) in enumerate(EVAL_LEVELS.items()):
            progress(f"image {n}/{len(images)} {im.name} ({im.pixels.shape[0]}x{im.pixels.shape[1]}), {level}")
            rng = np.random.default_rng([seed, n, li])
            noisy = xray_noisy(im, im.pixels, params, gain, sd, corr, rng)
            sigma = float(np.std(noisy - im.pixels))  # oracle: the true SD of the added noise
            key = f"xray:{im.name}:{level}:{seed}:{n}:{li}:{sigma:.5f}"
            out_model = run_model(network, card, noisy)
            out_nlm = cached(cache, "nlm:" + key, nlm, noisy, sigma)
            out_bm3d = cached(cache, f"bm3d:{crop}:" + key, bm3d_coloured, noisy[box], (noisy - im.pixels)[box])
            whole = {"input": noisy, "model": out_model, "nlm": out_nlm}
            rows = {m: scores(v, im.pixels, data_range) for m, v in whole.items()}
            crop_rows = {m: scores(v[box], im.pixels[box], data_range) for m, v in whole.items()}
            crop_rows["bm3d"] = scores(out_bm3d, im.pixels[box], data_range)
            scored.append(Scored(im.name, level, rows, crop_rows,
                                 {"noise_sd": round(sigma, 4), "gain": gain, "electronic_sd": sd,
                                  "correlation": corr, "data_range": data_range, "processed": im.processed,
                                  "inverted": im.inverted, "shape": list(im.pixels.shape)}))
            if level == "strong":
                c = im.pixels[box]
                window = tuple(np.percentile(c, [1, 99]))
                save_panels(out / f"{Path(im.name).stem}-{level}.png",
                            f"{card.name} {card.version}: {im.name}, {level} noise (crop {crop} px; "
                            f"PSNR model {crop_rows['model']['psnr']:.1f}, NLM {crop_rows['nlm']['psnr']:.1f}, "
                            f"BM3D {crop_rows['bm3d']['psnr']:.1f} dB)",
                            {"clean": c, "noisy": noisy[box], "NLM": out_nlm[box], "BM3D": out_bm3d,
                             "model": out_model[box], "|model - clean|": np.abs(out_model[box] - c)}, window)
    settings = {"levels": {k: {"gain": g, "electronic_sd": s, "correlation": c} for k, (g, s, c) in
                           EVAL_LEVELS.items()},
                "noise_units": "fractions of the clean image's p0.5-p99.5 range",
                "baseline_sigma": "oracle: NLM the true SD of the added noise; BM3D its power spectrum (on the crop)",
                "crop": crop, "seed": seed,
                "psnr_range": "clean image's p0.5-p99.5", "methods": ["input", "model", "nlm", "bm3d (crop)"]}
    metrics = write_report(out, card.name, scored, settings, ["input", "model", "nlm", "bm3d"])
    if write_card:
        store_card_metrics(model_dir, metrics)
    return metrics
