"""Datasets: DICOM folders into physical units, series-level splits, patch sampling, and training pairs.

A *series* is read whole (all files of one SeriesInstanceUID in a folder, single- or multi-frame, any transfer
syntax pydicom can decode) into a float32 volume ``(slices, rows, columns)`` in physical units (HU for CT via
the Rescale Slope/Intercept, stored values otherwise), sorted by position along the slice normal.

Splits are always by series, never by slice: slices of one series are correlated and would leak.

Pairs
    * :class:`SimulatedPairs`: one series; the input is the series with simulated lower-dose noise (precomputed
      per slice into a cache, since CT noise needs a projection and an FBP of the whole slice), the target is
      the series itself.
    * :class:`RealPairs`: a low-dose and a full-dose series of the same anatomy, slices matched by position
      (nearest slice within a tolerance); both must share the pixel grid.
    * :class:`SelfSupervisedPairs`: no clean data; Neighbor2Neighbor-style sub-sampled pairs of one noisy slice,
      or Noise2Sim-style pairs of adjacent (similar) slices.

All datasets yield ``(input, target)`` float32 tensors of shape ``(1, patch, patch)``, normalised by the
modality's :class:`Normalisation`, with random flips and 90-degree rotations applied identically to both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Reading series
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One series in physical units."""

    uid: str
    modality: str
    volume: np.ndarray  # (slices, rows, cols) float32
    pixel_mm: float
    positions: np.ndarray  # position of each slice along the normal (mm)
    thickness: float | None
    source: str  # folder or file it came from
    description: str = ""
    inverted: bool = False  # MONOCHROME1 stored values were inverted (max - value) so bright = more signal

    @property
    def name(self) -> str:
        return Path(self.source).name

    @property
    def key(self) -> str:
        """Unique among the series read: the folder name, plus the SeriesInstanceUID (a folder may hold several
        series, e.g. one patient's axial slices and reformats)."""
        return f"{self.name}/{self.uid}"

    def __repr__(self) -> str:  # keep the volume out of reprs
        return f"Series({self.name!r}, {self.modality}, {self.volume.shape}, {self.pixel_mm:.3f} mm)"


def _frames(ds) -> list[tuple[np.ndarray, float, float, np.ndarray | None]]:
    """Frames of one dataset as ``(stored pixels, slope, intercept, position)``."""
    pixels = ds.pixel_array
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    ipp = getattr(ds, "ImagePositionPatient", None)
    out = []
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    for i in range(pixels.shape[0]):
        s, b, pos = slope, intercept, (np.array(ipp, float) if ipp is not None else None)
        for groups in ([per_frame[i]] if per_frame is not None and i < len(per_frame) else []) + (
            [shared[0]] if shared else []
        ):
            if "PixelValueTransformationSequence" in groups:
                t = groups.PixelValueTransformationSequence[0]
                s = float(getattr(t, "RescaleSlope", s) or s)
                b = float(getattr(t, "RescaleIntercept", b) or b)
            if pos is None and "PlanePositionSequence" in groups:
                pos = np.array(groups.PlanePositionSequence[0].ImagePositionPatient, float)
        out.append((pixels[i], s, b, pos))
    return out


def _orientation(ds) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        if shared and "PlaneOrientationSequence" in shared[0]:
            iop = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
    if iop is None:
        return None
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    return np.cross(r, c)


def _pixel_mm(ds) -> float:
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if ps is None:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        if shared and "PixelMeasuresSequence" in shared[0]:
            ps = shared[0].PixelMeasuresSequence[0].PixelSpacing
    return float(ps[0]) if ps else 1.0


def _ct_series_in_hu(uid: str, path: Path, items: list) -> bool:
    """Whether a CT series' rescaled values are Hounsfield units, as the node decides it
    (:func:`dicom_node.denoise.pixels.ct_rescale_unit`): misspellings such as ``Houndsfield Unit`` are accepted
    and logged once for the series; another unit (``US``) leaves the series out with a warning."""
    from dicom_node.denoise.pixels import ct_rescale_unit

    units, quirks = set(), set()
    for _, ds in items:
        unit, as_written = ct_rescale_unit(getattr(ds, "RescaleType", None))
        units.add(unit)
        if as_written:
            quirks.add(as_written)
    if quirks:
        LOGGER.warning("%s series %s: RescaleType %s read as HU (CT rescaled values are Hounsfield units, "
                       "PS3.3 C.8.2.1)", path, uid, ", ".join(repr(q) for q in sorted(quirks)))
    if units != {"HU"}:
        LOGGER.warning("%s series %s: CT rescale type %s is not Hounsfield units; skipped", path, uid,
                       ", ".join(sorted(str(u) for u in units - {"HU"})))
        return False
    return True


def read_series(path: str | os.PathLike) -> list[Series]:
    """Read every series in a folder (or one file) into :class:`Series`, sorted by position along the normal.

    Non-image and undecodable files are skipped with a warning (a folder may hold a DICOMDIR or odd files).
    """
    import pydicom

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    groups: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # not DICOM
            continue
        if "PixelData" not in ds:
            continue
        groups[str(getattr(ds, "SeriesInstanceUID", f))].append((f, ds))
    result = []
    for uid, items in groups.items():
        slices = []
        first = items[0][1]
        if str(getattr(first, "Modality", "")) == "CT" and not _ct_series_in_hu(uid, path, items):
            continue
        normal = _orientation(first)
        for f, ds in items:
            try:
                frames = _frames(ds)
            except Exception as exc:  # undecodable transfer syntax
                LOGGER.warning("skipping %s: %s", f, exc)
                continue
            for k, (pix, s, b, pos) in enumerate(frames):
                z = float(pos @ normal) if (pos is not None and normal is not None) else float(
                    getattr(ds, "InstanceNumber", 0) or 0) + k
                slices.append((z, pix.astype(np.float32) * np.float32(s) + np.float32(b)))
        if not slices:
            continue
        shapes = {a.shape for _, a in slices}
        if len(shapes) != 1:
            LOGGER.warning("series %s mixes image sizes %s; skipped", uid, shapes)
            continue
        slices.sort(key=lambda t: t[0])
        volume = np.stack([a for _, a in slices])
        if volume.ndim == 4:  # colour: not for us
            continue
        thickness = getattr(first, "SliceThickness", None)
        inverted = str(getattr(first, "PhotometricInterpretation", "")) == "MONOCHROME1"
        if inverted:
            volume = volume.max() - volume
        result.append(Series(
            uid=uid, modality=str(getattr(first, "Modality", "OT")), volume=volume, pixel_mm=_pixel_mm(first),
            positions=np.array([z for z, _ in slices]), thickness=float(thickness) if thickness else None,
            source=str(path), description=str(getattr(first, "SeriesDescription", "")), inverted=inverted,
        ))
    return result


def read_one_series(path: str | os.PathLike) -> Series:
    """The single series in ``path``; error when there are none or several."""
    found = read_series(path)
    if len(found) != 1:
        raise ValueError(f"{path}: expected one series, found {len(found)}")
    return found[0]


def shared_data_dir() -> Path:
    """The real-data folder: ``$DICOM_NODE_SHARED_DATA`` or ``../shared/data`` beside the project root."""
    root = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("DICOM_NODE_SHARED_DATA", root.parent / "shared" / "data")).resolve()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute or existing, else relative to :func:`shared_data_dir`."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return shared_data_dir() / p


def split_by_series(series: Sequence[Series], validation: Iterable[str]) -> tuple[list[Series], list[Series]]:
    """Split whole series into train / validation by folder name (never by slice)."""
    names = set(validation)
    val = [s for s in series if s.name in names]
    train = [s for s in series if s.name not in names]
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Normalisation and augmentation
# ---------------------------------------------------------------------------------------------------------------


def normalisation_params(norm, image: np.ndarray) -> tuple[float, float, tuple[float, float] | None]:
    """``(offset, scale, clip)`` that map ``image`` to the network input under a card's ``Normalization``.

    Fixed mode: the card's constants. Per-image mode: ``offset = p_low``, ``scale = p_high - p_low`` from the
    image's ``percentiles`` (computed on the *input* image, as the inference engine must do).
    """
    if norm.mode == "fixed":
        return float(norm.offset), float(norm.scale), (tuple(norm.clip) if norm.clip else None)
    lo, hi = np.percentile(image, list(norm.percentiles))
    return float(lo), float(max(hi - lo, 1e-6)), None


def to_network(x: np.ndarray, params) -> np.ndarray:
    offset, scale, clip = params
    if clip is not None:
        x = np.clip(x, clip[0], clip[1])
    return ((x - offset) / scale).astype(np.float32)


def ct_normalization():
    """The CT input normalisation of every CT model trained here: ``(clip(HU, -1024, 3071) - 0) / 1000``."""
    from models.folder import Normalization

    return Normalization(input_unit="HU", mode="fixed", offset=0.0, scale=1000.0, clip=[-1024.0, 3071.0])


def per_image_normalization():
    from models.folder import Normalization

    return Normalization(input_unit="modality", mode="per-image", percentiles=[0.5, 99.5])


def augment(pair: tuple[torch.Tensor, ...], rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """The same random flip and 90-degree rotation for every tensor of ``pair`` (shape ``(..., H, W)``)."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for t in pair:
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(torch.rot90(t, k, dims=(-2, -1)).contiguous())
    return tuple(out)


def random_patch_origin(shape: tuple[int, int], patch: int, rng: np.random.Generator,
                        weight: np.ndarray | None = None) -> tuple[int, int]:
    h, w = shape
    if weight is not None and rng.random() < 0.9:  # prefer patches on the object
        for _ in range(10):
            y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
            if weight[y + patch // 2, x + patch // 2]:
                return y, x
    return int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))


# ---------------------------------------------------------------------------------------------------------------
# Noise models (configurable) and the simulated-pair cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NoiseSettings:
    """How simulated pairs are made (one TOML ``[noise]`` table).

    ``kind``: ``ct`` (projection-domain, flux self-calibrated per series from its own flat-region noise SD, then
    multiplied by a factor drawn log-uniformly in ``flux_jitter``), ``rician`` (sigma as a fraction of the
    normalisation scale drawn in ``sigma_range``), ``poisson-gaussian`` (gain and electronic SD as fractions of
    the scale).
    """

    kind: str = "ct"
    dose_range: tuple[float, float] = (0.25, 0.25)
    flux_jitter: tuple[float, float] = (1.0, 1.0)
    flux: float | None = None  # fixed I0 instead of self-calibration
    electronic_sd: float = 10.0
    n_views: int = 360
    window: str = "hann"
    cutoff: float = 1.0
    cutoff_range: tuple[float, float] | None = None  # draw the FBP window cutoff per realisation (noise texture)
    realisations: int = 2
    sigma_range: tuple[float, float] = (0.02, 0.08)
    gain_range: tuple[float, float] = (0.002, 0.01)
    seed: int = 0
    # Body CT physics (training.noise.CTNoiseSimulator); the defaults are the original head-CT simulator.
    dose_sampling: str = "uniform"  # uniform | log-uniform (5-100 % dose: as many samples per octave of dose)
    bowtie_edge: float = 1.0  # bowtie transmission at the edge of bowtie_fov_mm (1: no bowtie)
    bowtie_fov_mm: float = 500.0
    tcm_strength: float = 0.0  # per-view tube current ~ attenuation^strength (0: none, 0.5: noise-optimal)
    tcm_range: tuple[float, float] | None = None  # draw the modulation strength per realisation
    electronic_model: str = "scaled"  # scaled (original) | variance (fixed electronic SD, dominates at low flux)
    electronic_range: tuple[float, float] | None = None  # draw the electronic SD (quanta) per realisation
    kernels: tuple[str, ...] = ()  # draw a reconstruction kernel (training.noise.KERNELS) per realisation
    noise_sd_max: float = 0.0  # > 0: cap the input's total noise SD (HU, over the body) at this (lower dose -> SD)


def ct_simulator(settings: NoiseSettings):
    from training.noise import CTNoiseSimulator, ParallelBeam

    return CTNoiseSimulator(
        geometry=ParallelBeam(n_views=settings.n_views, window=settings.window, cutoff=settings.cutoff),
        electronic_sd=settings.electronic_sd, bowtie_edge=settings.bowtie_edge,
        bowtie_fov_mm=settings.bowtie_fov_mm, tcm_strength=settings.tcm_strength,
        electronic_model=settings.electronic_model,
    )


def draw_dose(settings: NoiseSettings, rng: np.random.Generator) -> float:
    """A dose fraction from ``dose_range``: uniform, or log-uniform (``dose_sampling = "log-uniform"``)."""
    lo, hi = settings.dose_range
    if settings.dose_sampling == "log-uniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def draw_ct_realisation(settings: NoiseSettings, rng: np.random.Generator, pixel_mm: float):
    """``(simulator, description)`` for one noise realisation: the kernel, tube current modulation and electronic
    noise drawn from the ranges in ``settings`` (the settings themselves when no range is given)."""
    from training.noise import kernel

    changes: dict[str, Any] = {}
    if settings.kernels:
        k = kernel(str(settings.kernels[int(rng.integers(len(settings.kernels)))]))
        changes["cutoff"] = k.cutoff_fraction(pixel_mm)
        changes["window"] = k.window
    if settings.tcm_range:
        changes["tcm_strength"] = float(rng.uniform(*settings.tcm_range))
    if settings.electronic_range:
        changes["electronic_sd"] = float(rng.uniform(*settings.electronic_range))
    return (ct_simulator(dataclasses.replace(settings, **changes)) if changes else ct_simulator(settings)), changes


def series_noise_sd(series: Series, max_slices: int = 7) -> float:
    """Median flat-region noise SD (HU) over up to ``max_slices`` slices spread over the central 60% of a series.

    The end slices of a head series (skull base, vertex) have little flat tissue and much bone texture, so they
    are left out; each slice gives the median local SD over its flat mask (see ``training.noise.noise_sd``).
    """
    from training.noise import flat_mask, noise_sd

    n = len(series.volume)
    idx = np.unique(np.linspace(0.2 * (n - 1), 0.8 * (n - 1), min(max_slices, n)).round().astype(int))
    sds = []
    for i in idx:
        m = flat_mask(series.volume[i])
        if int(m.sum()) >= 200:
            sds.append(noise_sd(series.volume[i], m))
    return float(np.median(sds)) if sds else float("nan")


def calibrate_series_flux(series: Series, settings: NoiseSettings, max_slices: int = 3,
                          device: str | torch.device | None = None) -> tuple[float, float, float]:
    """Self-calibration: ``(I0, measured SD, simulated SD)`` so the simulator's full-dose noise matches the scan
    (projections and FBPs on ``device``)."""
    from training.noise import calibrate_flux, flat_mask

    target = series_noise_sd(series)
    if not math.isfinite(target):
        raise ValueError(f"{series.name}: no flat region to measure noise on; set noise.flux")
    n = len(series.volume)
    # (n - 1): a single-slice series (the body CT slices) must give index 0, not 1
    idx = np.unique(np.linspace((n - 1) * 0.25, (n - 1) * 0.75, max_slices).round().astype(int))
    slices, masks = [], []
    for i in idx:
        m = flat_mask(series.volume[i])
        if int(m.sum()) >= 200:
            slices.append(series.volume[i])
            masks.append(m)
    if not slices:
        slices = [series.volume[len(series.volume) // 2]]
        masks = [flat_mask(slices[0])]
    flux, sim = calibrate_flux(ct_simulator(settings), slices, series.pixel_mm, target, masks, iterations=1,
                               seed=settings.seed, device=device)
    return flux, target, sim


class NoisyCache:
    """Per slice, ``realisations`` noisy versions (physical units) made once; what :class:`SimulatedPairs` draws
    from."""

    def __init__(self, series: Sequence[Series], settings: NoiseSettings,
                 slices: dict[str, list[int]] | None = None, progress: bool = True,
                 cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None) -> None:
        from tqdm import tqdm

        disk = Path(cache_dir) if cache_dir else None
        if disk is not None:
            import hashlib
            import json as _json

            key = _json.dumps({"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in vars(settings).items()},
                               "series": [(s.source, s.uid, s.volume.shape, (slices or {}).get(s.key))
                                          for s in series]}, sort_keys=True, default=str)
            disk = disk / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")
            if disk.exists():
                with np.load(disk, allow_pickle=False) as z:
                    meta = _json.loads(str(z["meta"]))
                    self.settings = settings
                    self.flux: dict[str, float] = meta["flux"]
                    # (series index, slice index, noisy versions)
                    self.entries: list[tuple[int, int, list[np.ndarray]]] = [
                        (si, k, [z[f"v{i}_{r}"] for r in range(n)]) for i, (si, k, n) in enumerate(meta["entries"])]
                LOGGER.info("noise cache read from %s", disk)
                return

        self.settings = settings
        self.entries = []
        self.flux = {}
        self.own_sd: dict[str, float] = {}  # each series' own flat-region noise SD (HU)
        rng = np.random.default_rng(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        jobs: list[tuple[int, int]] = []  # (series index, slice index)
        for si, s in enumerate(series):
            chosen = slices.get(s.key) if slices else None
            chosen = chosen if chosen is not None else list(range(len(s.volume)))
            jobs.extend((si, k) for k in chosen)
        simulator = ct_simulator(settings) if settings.kind == "ct" else None
        # Projection and FBP of 512x512 slices dominate; a GPU does them in milliseconds. The counts are still
        # drawn from the CPU generator, so a seed gives the same noise on either device.
        device = torch.device(device or ("cuda" if torch.cuda.is_available() and simulator is not None else "cpu"))
        if simulator is not None:
            for s in series:
                if settings.flux is not None:
                    self.flux[s.key] = float(settings.flux)
                    if settings.noise_sd_max:
                        self.own_sd[s.key] = series_noise_sd(s)
                else:
                    flux, measured, simulated = calibrate_series_flux(s, settings, device=device)
                    LOGGER.info("flux for %s: I0=%.3g (flat-region SD measured %.2f HU, simulated %.2f HU)",
                                s.name, flux, measured, simulated)
                    self.flux[s.key] = flux
                    self.own_sd[s.key] = measured
        for si, k in tqdm(jobs, desc="simulating noise", disable=not progress, leave=False):
            s = series[si]
            clean = torch.from_numpy(s.volume[k]).to(device)
            scale = float(max(np.percentile(s.volume[k], 99.5), 1e-6))
            versions = []
            p = simulator.line_integrals(clean, s.pixel_mm) if simulator is not None else None
            for _ in range(settings.realisations):
                if settings.kind == "ct":
                    d = draw_dose(settings, rng)
                    j = math.exp(rng.uniform(math.log(settings.flux_jitter[0]), math.log(settings.flux_jitter[1])))
                    if simulator is None:  # made above for kind "ct"
                        raise RuntimeError("CT noise without a CT simulator")
                    sim_k, flux_k = simulator, self.flux[s.key] * j
                    if settings.kernels or settings.tcm_range or settings.electronic_range:
                        # Body CT: the kernel changes the noise level at a given dose as it does on a scanner.
                        sim_k, _ = draw_ct_realisation(settings, rng, s.pixel_mm)
                    elif settings.cutoff_range:
                        # Another kernel: noise SD scales about as cutoff^1.5 at a given flux, so scale the flux
                        # by (c / c_nominal)^3 to keep the calibrated noise level while the texture changes.
                        c = float(rng.uniform(*settings.cutoff_range))
                        sim_k = ct_simulator(dataclasses.replace(settings, cutoff=c))
                        flux_k *= (c / settings.cutoff) ** 3
                    noise = sim_k.added_noise(clean, s.pixel_mm, flux_k, d, gen, p=p)
                    if settings.noise_sd_max:
                        from training.noise import limit_noise_sd

                        noise, _ = limit_noise_sd(noise, clean, self.own_sd.get(s.key, float("nan")),
                                                  settings.noise_sd_max)
                    versions.append((clean + noise).cpu().numpy().astype(np.float32))
                elif settings.kind == "rician":
                    from training.noise import rician

                    sigma = float(rng.uniform(*settings.sigma_range)) * scale
                    versions.append(rician(clean.clamp(min=0), sigma, gen).numpy().astype(np.float32))
                elif settings.kind == "poisson-gaussian":
                    from training.noise import poisson_gaussian

                    gain = float(rng.uniform(*settings.gain_range)) * scale
                    sigma_e = float(rng.uniform(*settings.sigma_range)) * scale * 0.5
                    versions.append(poisson_gaussian(clean.clamp(min=0), gain, sigma_e, gen).numpy().astype(np.float32))
                else:
                    raise ValueError(f"unknown noise kind {settings.kind!r}")
            self.entries.append((si, k, versions))
        if disk is not None:
            import json as _json

            disk.parent.mkdir(parents=True, exist_ok=True)
            arrays: dict[str, Any] = {f"v{i}_{r}": v for i, (_, _, vs) in enumerate(self.entries)
                                      for r, v in enumerate(vs)}
            meta = {"flux": self.flux, "entries": [(si, k, len(vs)) for si, k, vs in self.entries]}
            tmp = disk.with_suffix(".tmp.npz")
            np.savez(tmp, meta=np.array(_json.dumps(meta)), **arrays)
            os.replace(tmp, disk)


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


class _PatchDataset(torch.utils.data.Dataset):
    """Base: a run is one epoch of ``length`` random patches; ``__getitem__(i)`` is deterministic in ``(seed, i)``."""

    def __init__(self, patch: int, length: int, normalisation, seed: int, augment: bool = True):
        self.patch = int(patch)
        self.length = int(length)
        self.norm = normalisation
        self.seed = int(seed)
        self.augment = augment

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        # The 0 was an epoch number that never changed (a run is one epoch); kept so a seed draws the same patches.
        return np.random.default_rng([self.seed, 0, int(index)])

    def _params(self, key, image: np.ndarray):
        if self.norm.mode == "fixed":
            return normalisation_params(self.norm, image)
        cache = self.__dict__.setdefault("_param_cache", {})
        if key not in cache:
            cache[key] = normalisation_params(self.norm, image)
        return cache[key]

    def _finish(self, a: np.ndarray, b: np.ndarray, rng, params) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(to_network(a, params)))[None]
        y = torch.from_numpy(np.ascontiguousarray(to_network(b, params)))[None]
        if self.augment:
            x, y = augment((x, y), rng)
        return x, y


class SimulatedPairs(_PatchDataset):
    """Simulated low-dose input, original series as target (patches from :class:`NoisyCache`)."""

    def __init__(self, series: Sequence[Series], cache: NoisyCache, patch: int, length: int,
                 normalisation, seed: int = 0, augment: bool = True) -> None:
        super().__init__(patch, length, normalisation, seed, augment)
        self.series = list(series)
        self.cache = cache
        if not cache.entries:
            raise ValueError("no slices to train on")
        self._fg: dict[tuple[int, int], np.ndarray] = {}

    def _foreground(self, si: int, k: int) -> np.ndarray:
        key = (si, k)
        if key not in self._fg:
            img = self.series[si].volume[k]
            thr = -500.0 if self.series[si].modality == "CT" else float(np.percentile(img, 50))
            self._fg[key] = img > thr
        return self._fg[key]

    def __getitem__(self, index: int):
        rng = self._rng(index)
        si, k, versions = self.cache.entries[int(rng.integers(len(self.cache.entries)))]
        clean = self.series[si].volume[k]
        v = int(rng.integers(len(versions)))
        noisy = versions[v]
        params = self._params((si, k, v), noisy)
        p = min(self.patch, *clean.shape)
        y0, x0 = random_patch_origin(clean.shape, p, rng, self._foreground(si, k))
        return self._finish(noisy[y0:y0 + p, x0:x0 + p], clean[y0:y0 + p, x0:x0 + p], rng, params)


def match_slices(low: Series, full: Series, tolerance_mm: float | None = None) -> list[tuple[int, int]]:
    """Pairs ``(i_low, i_full)`` of slices at the same position (nearest within ``tolerance_mm``).

    Refuses series on different pixel grids: a real pair must be voxel-aligned in-plane.
    """
    if low.volume.shape[1:] != full.volume.shape[1:] or abs(low.pixel_mm - full.pixel_mm) > 1e-3:
        raise ValueError(f"{low.name} and {full.name} are not on the same pixel grid")
    tol = tolerance_mm if tolerance_mm is not None else 0.5 * min(low.thickness or 1.0, full.thickness or 1.0)
    pairs = []
    for i, z in enumerate(low.positions):
        j = int(np.argmin(np.abs(full.positions - z)))
        if abs(full.positions[j] - z) <= tol:
            pairs.append((i, j))
    return pairs


class RealPairs(_PatchDataset):
    """Real low-dose input and full-dose target of the same anatomy, slices matched by position."""

    def __init__(self, pairs: Sequence[tuple[Series, Series]], patch: int, length: int,
                 normalisation, seed: int = 0, augment: bool = True, tolerance_mm: float | None = None):
        super().__init__(patch, length, normalisation, seed, augment)
        self.items = []
        for low, full in pairs:
            for i, j in match_slices(low, full, tolerance_mm):
                self.items.append((low.volume[i], full.volume[j]))
        if not self.items:
            raise ValueError("no slices matched by position between the low-dose and full-dose series")

    def __getitem__(self, index: int):
        rng = self._rng(index)
        i = int(rng.integers(len(self.items)))
        a, b = self.items[i]
        params = self._params(i, a)
        p = min(self.patch, *a.shape)
        y0, x0 = random_patch_origin(a.shape, p, rng)
        return self._finish(a[y0:y0 + p, x0:x0 + p], b[y0:y0 + p, x0:x0 + p], rng, params)


class SelfSupervisedPairs(_PatchDataset):
    """Pairs without clean data, from noisy series only.

    ``method="noise2sim"``: input a patch of slice ``k``, target the same patch of slice ``k +/- 1`` (Noise2Sim,
    Niu et al. 2023, with the similar-slice search reduced to the adjacent slice; best for thin slices). Noise in
    neighbouring slices is independent while anatomy is nearly the same, so the network learns the conditional
    mean of the signal even when the noise is spatially correlated in-plane (where per-pixel blind-spot methods
    learn to keep the noise).

    ``method="neighbor2neighbor"``: returns the full-resolution patch as input and as target; the loop makes the
    two sub-sampled images and applies the N2N regulariser (see ``training.loops``).
    """

    def __init__(self, series: Sequence[Series], patch: int, length: int, normalisation,
                 method: str = "noise2sim", seed: int = 0, augment: bool = True) -> None:
        super().__init__(patch, length, normalisation, seed, augment)
        if method not in {"noise2sim", "neighbor2neighbor"}:
            raise ValueError(f"unknown self-supervised method {method!r}")
        self.method = method
        self.series = list(series)
        self.index = [(si, k) for si, s in enumerate(self.series) for k in range(len(s.volume))
                      if method == "neighbor2neighbor" or len(s.volume) > 1]
        if not self.index:
            raise ValueError("no slices for self-supervised pairs (noise2sim needs series of 2+ slices)")

    def __getitem__(self, index: int):
        rng = self._rng(index)
        si, k = self.index[int(rng.integers(len(self.index)))]
        vol = self.series[si].volume
        params = self._params((si, k), vol[k])
        p = min(self.patch, *vol.shape[1:])
        y0, x0 = random_patch_origin(vol.shape[1:], p, rng)
        a = vol[k, y0:y0 + p, x0:x0 + p]
        if self.method == "noise2sim":
            j = k + (1 if (k == 0 or (k + 1 < len(vol) and rng.random() < 0.5)) else -1)
            b = vol[j, y0:y0 + p, x0:x0 + p]
            if rng.random() < 0.5:
                a, b = b, a
        else:
            b = a
        return self._finish(a, b, rng, params)
