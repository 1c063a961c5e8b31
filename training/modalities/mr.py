"""MR recipe: real magnitude series, noise simulated where it arises (complex receiver noise), subject split.

Data
    Every series named in the config: DICOM folders (classic single-frame, or multi-frame Enhanced MR where a
    folder of several multi-frame files holds repeats of one volume, e.g. BOLD) and volume files read with
    SimpleITK (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``). Values are the Modality LUT output (rescaled stored
    values), kept as they are: no clipping, so bright vessels and fat keep their values.
Split
    By subject: ``[recipe] subjects`` maps a subject to its folders; :func:`check_subject_split` refuses a config
    whose train, validation and evaluation folders share a subject (the 20 BOLD repeats and the T1 of the same
    volunteer are one subject).
Noise
    :func:`add_mr_noise`: the clean magnitude (with zero or a smooth phase) is the complex image of each coil;
    circular complex Gaussian noise of SD ``sigma`` per real/imaginary part is added (the same as adding it in
    k-space with an orthonormal FFT: white noise stays white), and the magnitude (one coil: Rician) or the
    root-sum-of-squares over ``N`` coils (non-central chi with ``2N`` degrees of freedom) is taken, so dark regions
    get the positive noise floor a real scanner gives. ``sigma`` is a fraction of the volume's foreground level
    (the mean over the object), drawn log-uniformly in ``[noise] sigma_range``.
Targets
    The "clean" targets are real images with their own noise (the 1 mm volumes are fairly clean; the thick 2D
    slices, BOLD and the phantom less so). The network learns to remove the *added* noise; residual noise of the
    target is left in, and the scores below are against these same, slightly noisy, references.
Input
    ``[recipe] context`` neighbouring slices on each side (nearest slice repeated at the ends, as the node does),
    each with its own noise; normalised as the node does for a ``per-image`` card: offset and scale from the
    0.5 / 99.5 percentiles of the noisy centre slice, applied to all slices, without clipping.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

#: Volume files read with SimpleITK instead of pydicom.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Noise levels of ``evaluate``: sigma as a fraction of the series' foreground level (SNR about 33, 17 and 8).
EVAL_SIGMA_FRACTIONS = (0.03, 0.06, 0.12)
#: Normalisation percentiles (the node's ``per-image`` mode): no clipping, the top only sets the scale.
PERCENTILES = (0.5, 99.5)
RECIPE_KEYS = {"context", "subjects", "coils", "phase", "min_foreground"}


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MRVolume:
    """One 3D (or stack of 2D) magnitude volume, ``(slices, rows, columns)`` float32 in modality units."""

    name: str
    volume: np.ndarray
    pixel_mm: float = 1.0

    def __repr__(self) -> str:
        return f"MRVolume({self.name!r}, shape={self.volume.shape})"


def read_mr_volumes(path: str | Path) -> list[MRVolume]:
    """Every MR volume in ``path``: a SimpleITK volume file, a DICOM file, or a folder of DICOM files.

    A folder of several multi-frame files (Enhanced MR repeats such as BOLD) gives one volume per file, so that
    repeats at the same position are not interleaved into one stack.
    """
    import pydicom

    from training.data import read_series

    path = Path(path)
    if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        if array.ndim == 2:
            array = array[None]
        return [MRVolume(path.name.split(".")[0], array, float(image.GetSpacing()[0]))]
    if path.is_file():
        return [MRVolume(path.stem, s.volume, s.pixel_mm) for s in read_series(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    multi = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            multi.append(f)
    if len(multi) > 1:  # repeats of one volume, one per file
        out: list[MRVolume] = []
        for f in multi:
            out.extend(MRVolume(f"{path.name}/{f.stem[:4]}", s.volume, s.pixel_mm) for s in read_series(f))
        return out
    found = read_series(path)
    return [
        MRVolume(path.name if len(found) == 1 else f"{path.name}/{i}", s.volume, s.pixel_mm)
        for i, s in enumerate(found)
    ]


def object_mask(volume: np.ndarray) -> np.ndarray:
    """The object (head, body, phantom) of a magnitude volume: above a tenth of its 99th percentile after a light
    smoothing, holes filled slice by slice."""
    from scipy import ndimage

    smooth = ndimage.uniform_filter(volume.astype(np.float32), size=(1, 5, 5))
    mask = smooth > 0.1 * float(np.percentile(volume, 99))
    return np.stack([ndimage.binary_fill_holes(m) for m in mask])


def foreground_level(volume: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The mean signal over the object: what ``sigma`` fractions refer to."""
    mask = object_mask(volume) if mask is None else mask
    return float(volume[mask].mean()) if mask.any() else float(np.percentile(volume, 99))


def neighbour_indices(k: int, n: int, context: int) -> list[int]:
    """Slices ``k - context .. k + context``, the nearest slice repeated beyond the ends (as the node does)."""
    return [min(max(j, 0), n - 1) for j in range(k - context, k + context + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------


def smooth_phase(
    shape: tuple[int, int],
    rng: np.random.Generator,
    max_cycles: float = 1.0,
    window: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """A random linear phase ramp (up to ``max_cycles`` turns across an image of ``shape``) plus a constant: the
    smooth phase of a real acquisition (B0, coil and receiver phase), for images stored as magnitude only.
    ``window = (y0, x0, size)``: only that square of it."""
    h, w = shape[-2:]
    y0, x0, size = window if window else (0, 0, None)
    ys = (np.arange(y0, y0 + (size or h)) + 0.5) / h - 0.5
    xs = (np.arange(x0, x0 + (size or w)) + 0.5) / w - 0.5
    a, b = rng.uniform(-max_cycles, max_cycles, 2) * 2 * np.pi
    return (a * ys[:, None] + b * xs[None, :] + rng.uniform(0, 2 * np.pi)).astype(np.float32)


def add_mr_noise(
    clean: np.ndarray, sigma: float, rng: np.random.Generator, coils: int = 1, phase: np.ndarray | None = None
) -> np.ndarray:
    """The magnitude of ``clean`` with complex Gaussian receiver noise of SD ``sigma`` per real/imaginary part.

    Parameters
    ----------
    clean
        Magnitude image(s), any shape ``(..., H, W)``.
    sigma
        Noise SD of each real and imaginary part, per coil, in the units of ``clean``. Where the signal is large,
        the magnitude's noise SD is ``sigma``; where it is zero, one coil gives a Rayleigh floor of mean
        ``sigma * sqrt(pi / 2)``.
    coils
        1: single-channel magnitude (Rician). ``N > 1``: root-sum-of-squares of ``N`` coils whose sensitivities
        ``1 / sqrt(N)`` keep the combined signal equal to ``clean`` (non-central chi with ``2N`` degrees of
        freedom; per pixel only the sum of squared sensitivities matters, so equal coils are exact for it).
    phase
        Phase of the signal (radians, broadcast to ``clean``); ``None``: zero. Circular noise makes the
        magnitude's distribution independent of it; it is here so the complex image is that of a real scan.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``clean``.
    """
    if coils < 1:
        raise ValueError("coils must be >= 1")
    clean = np.asarray(clean, dtype=np.float32)
    signal = clean / np.float32(math.sqrt(coils))
    cos, sin = (np.float32(1), np.float32(0)) if phase is None else (np.cos(phase), np.sin(phase))
    total = np.zeros(clean.shape, dtype=np.float32)
    for _ in range(coils):
        re = signal * cos + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
        im = signal * sin + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
        total += re * re + im * im
    return np.sqrt(total)


def draw_sigma_fraction(sigma_range: Sequence[float], rng: np.random.Generator) -> float:
    """A noise level (fraction of the foreground level) drawn log-uniformly in ``sigma_range``: as many samples
    per octave of SNR."""
    lo, hi = float(sigma_range[0]), float(sigma_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"sigma_range {sigma_range} must satisfy 0 < low <= high")
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ---------------------------------------------------------------------------------------------------------------
# Subjects and datasets
# ---------------------------------------------------------------------------------------------------------------


def subject_of(folder: str, subjects: Mapping[str, Sequence[str]]) -> str:
    """The subject a data folder belongs to (its own name when ``subjects`` does not list it)."""
    for subject, folders in subjects.items():
        if folder in folders:
            return subject
    return folder


def check_subject_split(
    subjects: Mapping[str, Sequence[str]],
    train: Sequence[str],
    validation: Sequence[str] = (),
    evaluation: Sequence[str] = (),
) -> dict[str, list[str]]:
    """``{role: [subjects]}``; raises ``ValueError`` when a subject has folders in more than one role."""
    roles = {"train": train, "validation": validation, "evaluation": evaluation}
    owner: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for role, folders in roles.items():
        out[role] = []
        for folder in folders:
            subject = subject_of(folder, subjects)
            if owner.setdefault(subject, role) != role:
                raise ValueError(
                    f"subject {subject!r} ({folder}) is in both {owner[subject]} and {role}: split by subject"
                )
            if subject not in out[role]:
                out[role].append(subject)
    return out


class MRPairs(torch.utils.data.Dataset):
    """``(noisy slices, clean centre slice)`` patches; item ``i`` is a pure function of ``(seed, i)``.

    Sampling: a subject uniformly, then one of its folders, one of that folder's volumes (BOLD repeats), a slice
    with object in it, and a patch mostly over the object; then a noise level, a coil count and a phase ramp.
    """

    def __init__(
        self,
        groups: dict[str, dict[str, list[MRVolume]]],
        patch: int,
        length: int,
        *,
        seed: int = 0,
        context: int = 1,
        sigma_range: Sequence[float] = (0.01, 0.15),
        coils: Sequence[int] = (1,),
        phase: bool = True,
        augment: bool = True,
        min_foreground: float = 0.2,
    ) -> None:
        self.patch, self.length, self.seed = int(patch), int(length), int(seed)
        self.context, self.sigma_range, self.coils = int(context), tuple(sigma_range), tuple(int(c) for c in coils)
        self.phase, self.augment, self.min_foreground = bool(phase), bool(augment), float(min_foreground)
        self.groups: list[list[list[tuple[MRVolume, np.ndarray, float, list[int]]]]] = []
        for folders in groups.values():
            subject = []
            for volumes in folders.values():
                entries = []
                for v in volumes:
                    if min(v.volume.shape[1:]) < self.patch:
                        LOGGER.warning("%s: %s smaller than the %d px patch; skipped", v.name, v.volume.shape, patch)
                        continue
                    mask = object_mask(v.volume)
                    slices = [k for k in range(len(v.volume)) if mask[k].mean() > 0.05]
                    if slices:
                        entries.append((v, mask, foreground_level(v.volume, mask), slices))
                if entries:
                    subject.append(entries)
            if subject:
                self.groups.append(subject)
        if not self.groups:
            raise ValueError("no MR slices to train on")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        subject = self.groups[int(rng.integers(len(self.groups)))]
        folder = subject[int(rng.integers(len(subject)))]
        volume, mask, level, slices = folder[int(rng.integers(len(folder)))]
        vol = volume.volume
        k = slices[int(rng.integers(len(slices)))]
        p = self.patch
        h, w = vol.shape[1:]
        for _ in range(10):  # mostly object: background-only patches teach little
            y0, x0 = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
            if mask[k, y0 : y0 + p, x0 : x0 + p].mean() >= self.min_foreground:
                break
        idx = neighbour_indices(k, len(vol), self.context)
        clean = vol[idx, y0 : y0 + p, x0 : x0 + p]
        sigma = draw_sigma_fraction(self.sigma_range, rng) * level
        coils = self.coils[int(rng.integers(len(self.coils)))]
        phase = smooth_phase((h, w), rng, window=(y0, x0, p)) if self.phase else None
        noisy = add_mr_noise(clean, sigma, rng, coils, phase)
        # The node normalises by the whole noisy slice's percentiles: noise a strided sample of the centre slice
        # (pixels are independent, so its percentiles are those of the whole noisy slice) instead of all of it.
        stride = max(1, min(h, w) // 128)
        sample = add_mr_noise(vol[k, ::stride, ::stride], sigma, rng, coils)
        lo, hi = np.percentile(sample, PERCENTILES)
        scale = float(max(hi - lo, 1e-6))
        x = (noisy - np.float32(lo)) / np.float32(scale)
        y = (clean[self.context : self.context + 1] - np.float32(lo)) / np.float32(scale)
        if self.augment:
            if rng.integers(2):
                x, y = x[..., ::-1], y[..., ::-1]
            turns = int(rng.integers(4))
            x, y = np.rot90(x, turns, axes=(-2, -1)), np.rot90(y, turns, axes=(-2, -1))
            if self.context and rng.integers(2):  # slice order: the network should not care
                x = x[::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
        )


def recipe_settings(cfg) -> dict[str, Any]:
    """The ``[recipe]`` table with defaults, validated."""
    recipe = dict(getattr(cfg, "recipe", {}) or {})
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        known = ", ".join(sorted(RECIPE_KEYS))
        raise ValueError(f"[recipe]: unknown key(s) {', '.join(unknown)} for MR (known: {known})")
    out = {"context": 1, "subjects": {}, "coils": [1], "phase": True, "min_foreground": 0.2, **recipe}
    if not 0 <= int(out["context"]) <= 8:
        raise ValueError("[recipe] context must be 0-8")
    if any(int(c) < 1 for c in out["coils"]):
        raise ValueError("[recipe] coils must be >= 1")
    args = cfg.model.arguments
    expected = 2 * int(out["context"]) + 1
    if int(args.get("in_channels", 1)) != expected or int(args.get("out_channels", 1)) != 1:
        raise ValueError(
            f"[model] arguments: context {out['context']} needs in_channels = {expected}, out_channels = 1"
        )
    return out


def _load_groups(
    cfg, folders: Sequence[str], subjects: dict[str, Sequence[str]], progress: bool
) -> dict[str, dict[str, list[MRVolume]]]:
    groups: dict[str, dict[str, list[MRVolume]]] = {}
    for folder in folders:
        volumes = read_mr_volumes(cfg.data_path(folder))
        if not volumes:
            raise FileNotFoundError(f"no MR volume in {cfg.data_path(folder)}")
        if progress:
            LOGGER.info("%s: %d volume(s) %s", folder, len(volumes), volumes[0].volume.shape)
        groups.setdefault(subject_of(folder, subjects), {})[folder] = volumes
    return groups


def card_noise(cfg) -> dict[str, Any]:
    """The card's ``[noise]`` table: the simulation and what it drew from (``[noise] sigma_range``: noise SD as a
    fraction of the object's mean)."""
    settings = recipe_settings(cfg)
    return {"model": "complex Gaussian receiver noise, magnitude (Rician; non-central chi for coils > 1) "
                     "(training/modalities/mr.py)",
            "sigma_range": [float(v) for v in cfg.noise.sigma_range], "coils": [int(c) for c in settings["coils"]],
            "phase": bool(settings["phase"])}


def build_datasets(cfg, progress: bool = True):
    """``(train, validation or None, summary)`` for an MR config (``[noise] kind = "mr"``).

    Items are ``(noisy, clean)``: ``(2 * context + 1, patch, patch)`` and ``(1, patch, patch)`` float32 tensors.
    """
    settings = recipe_settings(cfg)
    d, n = cfg.data, cfg.noise
    split = check_subject_split(settings["subjects"], d.train, d.validation, cfg.evaluate.data)
    kwargs = dict(
        context=int(settings["context"]),
        sigma_range=tuple(n.sigma_range),
        coils=settings["coils"],
        phase=bool(settings["phase"]),
        min_foreground=float(settings["min_foreground"]),
    )
    train_groups = _load_groups(cfg, d.train, settings["subjects"], progress)
    train = MRPairs(train_groups, d.patch, cfg.train.steps * d.batch, seed=cfg.seed, augment=True, **kwargs)
    val = None
    if d.validation:
        val = MRPairs(
            _load_groups(cfg, d.validation, settings["subjects"], progress),
            d.patch,
            d.validation_patches,
            seed=cfg.seed + 1000,
            augment=False,
            **kwargs,
        )
    summary = {
        "train": list(d.train),
        "validation": list(d.validation),
        "pairs": "simulated",
        "subjects": split,
        "context": int(settings["context"]),
        "coils": list(settings["coils"]),
        "volumes": sum(len(v) for f in train_groups.values() for v in f.values()),
    }
    return train, val, summary


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def scores(reference: np.ndarray, image: np.ndarray, mask: np.ndarray, data_range: float) -> dict[str, float]:
    """PSNR and SSIM (scikit-image, 7x7 window) of ``image`` against ``reference`` over ``mask`` only."""
    from skimage.metrics import structural_similarity

    mse = float(np.mean((image[mask].astype(np.float64) - reference[mask]) ** 2))
    _, ssim_map = structural_similarity(
        reference.astype(np.float64), image.astype(np.float64), data_range=data_range, full=True
    )
    return {
        "psnr": 10 * math.log10(data_range**2 / max(mse, 1e-12)),
        "ssim": float(ssim_map[mask].mean()),
        "rmse": math.sqrt(mse),
    }


def _cached(cache: Path, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    path = cache / f"{key}.npy"
    if path.exists():
        return np.load(path)
    out = compute().astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def bm3d_magnitude(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (``bm3d`` package) on the magnitude image with white-noise SD ``sigma`` (the oracle value)."""
    import bm3d

    scale = float(max(np.percentile(noisy, 99.5), 1e-6))
    return bm3d.bm3d(noisy / scale, sigma_psd=sigma / scale) * scale


def nlm_magnitude(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """Non-local means (scikit-image, fast mode, ``h = 0.8 sigma``: its documented setting) with the oracle sigma."""
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, patch_size=5, patch_distance=6, h=0.8 * sigma, sigma=sigma, fast_mode=True)


def model_denoiser(network: torch.nn.Module, card) -> Callable[[np.ndarray], np.ndarray]:
    """``(2c+1, H, W)`` noisy slices -> denoised centre slice, normalised as the node does for the card."""
    lo_p, hi_p = card.normalization.percentiles

    @torch.no_grad()
    def run(stack: np.ndarray) -> np.ndarray:
        centre = stack[len(stack) // 2]
        lo, hi = np.percentile(centre, [lo_p, hi_p])
        scale = float(max(hi - lo, 1e-6))
        x = torch.from_numpy(((stack - lo) / scale).astype(np.float32))[None]
        return network(x)[0, 0].numpy().astype(np.float32) * scale + float(lo)

    return run


def _evaluation_slices(mask: np.ndarray, count: int) -> list[int]:
    """``count`` slices evenly spread over the middle 80 % of the slices with object in them."""
    slices = [k for k in range(len(mask)) if mask[k].mean() > 0.1]
    if not slices:
        slices = list(range(len(mask)))
    lo, hi = slices[int(0.1 * (len(slices) - 1))], slices[int(round(0.9 * (len(slices) - 1)))]
    inner = [k for k in slices if lo <= k <= hi]
    if count >= len(inner):
        return inner
    return sorted({inner[int(round(i))] for i in np.linspace(0, len(inner) - 1, count)})


def _figure(panels: list[tuple[str, np.ndarray]], vmax: float, path: Path) -> None:
    from PIL import Image, ImageDraw

    tiles = []
    for title, image in panels:
        grey = (np.clip(image / vmax, 0, 1) * 255).astype(np.uint8)
        tile = Image.fromarray(grey).convert("RGB")
        if tile.width < 384:
            factor = max(1, 384 // tile.width)
            tile = tile.resize((tile.width * factor, tile.height * factor), Image.Resampling.NEAREST)
        ImageDraw.Draw(tile).text((6, 4), title, fill=(255, 255, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    sheet.save(path)


def evaluate(
    model_dir: str | Path,
    data: Sequence[str],
    out_dir: str | Path,
    *,
    seed: int = 1234,
    max_images: int = 4,
    progress: Callable[[str], None] = _quiet,
    write_card: bool = False,
    sigma_fractions: Sequence[float] = EVAL_SIGMA_FRACTIONS,
    baselines: Sequence[str] = ("bm3d", "nlm"),
    cache_dir: str | Path = "runs/.baseline-cache/mr",
) -> dict[str, Any]:
    """Score an MR model folder on held-out series at simulated noise levels, beside BM3D and non-local means.

    For each series in ``data`` (first volume of each) and each level of ``sigma_fractions`` (single-coil Rician
    noise, sigma a fraction of the series' foreground level), ``max_images`` slices: the noisy input, the model,
    BM3D and NLM (both told the true sigma: an oracle that favours them) are scored against the original slice by
    PSNR (peak: the series' 0.5-99.5 percentile range) and SSIM, both over the object only. Writes
    ``metrics.json``, ``table.md`` and one figure per series; ``write_card`` stores the summary in the card.
    """
    from models.folder import load_model_folder, update_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir)
    loaded = load_model_folder(model_dir, "cpu")
    network, card = loaded.network, loaded.card
    context = int(getattr(card, "context", 0))
    denoise = model_denoiser(network, card)
    rows: list[dict[str, Any]] = []
    for path in data:
        volume = read_mr_volumes(path)[0]
        name = Path(path).name.split(".")[0]
        vol = volume.volume
        mask = object_mask(vol)
        level = foreground_level(vol, mask)
        lo, hi = np.percentile(vol, PERCENTILES)
        data_range = float(hi - lo)
        slices = _evaluation_slices(mask, max_images)
        progress(f"{name}: {vol.shape}, foreground level {level:.4g}, slices {slices}")
        for li, fraction in enumerate(sigma_fractions):
            sigma = fraction * level
            per_method: dict[str, list[dict[str, float]]] = {}
            figure_done = False
            for k in slices:
                idx = neighbour_indices(k, len(vol), context)
                # Every slice gets its own noise; the scored slice is the same realisation for every method.
                noisy_all = {j: add_mr_noise(vol[j], sigma, np.random.default_rng([seed, li, j])) for j in set(idx)}
                noisy = noisy_all[k]
                clean = vol[k]
                outputs = {"input": noisy, "model": denoise(np.stack([noisy_all[j] for j in idx]))}
                digest = hashlib.sha1(noisy.tobytes()).hexdigest()[:16]
                if "bm3d" in baselines:
                    outputs["bm3d"] = _cached(
                        cache, f"bm3d-{digest}-{sigma:.6g}", functools.partial(bm3d_magnitude, noisy, sigma)
                    )
                if "nlm" in baselines:
                    outputs["nlm"] = _cached(
                        cache, f"nlm-{digest}-{sigma:.6g}", functools.partial(nlm_magnitude, noisy, sigma)
                    )
                for method, image in outputs.items():
                    per_method.setdefault(method, []).append(scores(clean, image, mask[k], data_range))
                if not figure_done and k == slices[len(slices) // 2]:
                    panels = [
                        ("noisy", noisy),
                        ("BM3D (oracle sigma)", outputs.get("bm3d", noisy)),
                        (f"{card.name} {card.version}", outputs["model"]),
                        ("clean", clean),
                    ]
                    _figure(panels, float(hi), out / f"{name}-sigma{fraction:g}.png")
                    figure_done = True
            for method, values in per_method.items():
                rows.append(
                    {
                        "series": name,
                        "sigma_fraction": fraction,
                        "sigma": round(sigma, 4),
                        "method": method,
                        "slices": len(values),
                        **{m: float(np.mean([v[m] for v in values])) for m in ("psnr", "ssim", "rmse")},
                    }
                )
            line = ", ".join(f"{r['method']} {r['psnr']:.2f} dB / {r['ssim']:.4f}" for r in rows[-len(per_method) :])
            progress(f"{name} sigma {fraction:g}: {line}")
    metrics = {
        "model": card.name,
        "version": card.version,
        "modality": "MR",
        "seed": seed,
        "noise": "single-coil Rician, sigma = fraction x mean object signal",
        "psnr_peak": "the series' 0.5-99.5 percentile range",
        "region": "object mask",
        "baselines": list(baselines),
        "rows": rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "table.md").write_text(table_markdown(rows))
    if write_card:
        card.metrics = card_metrics(rows)
        update_card(card, model_dir)
    return metrics


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per series, noise level and method."""
    lines = [
        "| series | sigma (fraction of object mean) | method | PSNR dB | SSIM | RMSE | slices |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['series']} | {r['sigma_fraction']:g} | {r['method']} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} | {r['rmse']:.4g} | {r['slices']} |"
        )
    return "\n".join(lines) + "\n"


def card_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"<series>-sigma<f>": {"<method>_psnr": .., "<method>_ssim": ..}}`` for ``card.toml``."""
    out: dict[str, Any] = {
        "noise": "single-coil Rician, sigma as a fraction of the mean object signal",
        "baseline": "bm3d (oracle sigma), nlm",
    }
    for r in rows:
        entry = out.setdefault(f"{r['series']}-sigma{r['sigma_fraction']:g}".replace(".", "_"), {})
        entry[f"{r['method']}_psnr"] = round(r["psnr"], 3)
        entry[f"{r['method']}_ssim"] = round(r["ssim"], 4)
    return out
