"""Check the body-CT noise simulation against real scans, and match its kernels to the real series.

Run (about 5-10 minutes on 2 CPU cores; prints the numbers and writes the figure)::

    python -m training.noise_check --figure docs/images/ct-noise-simulation-check.png --json runs/noise-check.json

What it measures, always with the same estimator on real and simulated noise (32x32 ROIs inside flat regions of
:func:`training.noise.flat_mask`, each ROI detrended by a least-squares quadratic surface so that slow anatomy
does not count as noise; the noise SD is :func:`training.noise.noise_sd`, the median 15x15 local SD):

1. **Kernels.** For each group of real series with one reconstruction kernel (GE STANDARD / SOFT / STD+, Toshiba
   FC07 / FC17, Philips UB) the mean frequency of the noise power spectrum (NPS) of its flat regions, and the
   Hann cutoff (cycles/mm) whose simulated noise has the same mean frequency at that pixel size (simulated in a
   water ellipse, 128x128 window reconstructed). :data:`training.noise.KERNELS` holds the result.
2. **Phantom pair.** The Philips head phantom scanned at two doses, its noise measured on differences of
   neighbouring slices over sqrt(2) (the inserts run along z, so their structure cancels): flux self-calibrated on
   the high-dose
   2.5 mm series, the simulator predicts the noise SD and NPS of the low-dose 5 mm and 1 mm series at the
   relative dose ``(CTDIvol x thickness)_low / (CTDIvol x thickness)_high`` (the 1 mm series is reconstructed with
   iDose, iterative, which an FBP simulator cannot predict: its SD is reported, not matched).
3. **Real low-dose pelvis.** The 60 mA pelvis (CCTH-A01) has no full-dose partner: the simulator, calibrated on its
   own SD, makes the noise of its own dose, and the NPS and the anisotropy of the noise (ratio of NPS power along
   the horizontal and the vertical frequency axis: below 1 when streaks run left-right, along the long axis of the
   body) are compared with the real noise, for the original head simulator and for the body simulator
   (bowtie, tube current modulation, electronic noise, matched kernel).
4. **Noise range.** Input noise SD (the scan's own plus the added) on held-out body slices for every kernel and the
   doses 5-100 %: the range training draws from (the issue asks for about 5-150 HU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

ROI = 32
PHANTOM_ROI = 16  # the phantom's flat inserts are small: 32x32 ROIs barely fit in them

#: Real series grouped by reconstruction kernel: (label, kernel, folder, filter on ImageType/orientation).
KERNEL_GROUPS = [
    ("GE STANDARD pelvis 2.5 mm (60 mA)", "STANDARD", "ct/tcia-cc-tumor-pelvis-lowdose-2.5mm"),
    ("GE STANDARD body axial (COVID-19-NY-SBU)", "STANDARD", "ct/tcia-covid19-ny-sbu-body-slices"),
    ("Toshiba FC07 body MPR", "FC07", "ct/tcia-covid19-ny-sbu-body-slices"),
    ("Toshiba FC17 body axial", "FC17", "ct/tcia-covid19-ny-sbu-body-slices"),
    ("GE SOFT limb", "SOFT", "ct/tcia-sts-limb-cropped"),
    ("GE STANDARD limb", "STANDARD", "ct/tcia-sts-limb-cropped"),
    ("GE STD+ head 7 mm", "STD+", "ct/ge-head-7mm"),
    ("Philips UB phantom 2.5 mm (high dose)", "UB", "ct/philips-head-phantom-highdose-2.5mm"),
]

PHANTOM_HIGH = "ct/philips-head-phantom-highdose-2.5mm"
PHANTOM_LOWS = ["ct/philips-head-phantom-lowdose-5mm", "ct/philips-head-phantom-lowdose-1mm"]
PELVIS = "ct/tcia-cc-tumor-pelvis-lowdose-2.5mm"
DOSES = (0.05, 0.1, 0.25, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------------------------


def _quadratic_basis(n: int) -> np.ndarray:
    y, x = np.mgrid[:n, :n].astype(np.float64) / (n - 1) - 0.5
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], -1).reshape(-1, 6)


def detrended_rois(image: np.ndarray, mask: np.ndarray, size: int = ROI, stride: int = 16,
                   limit: int = 64) -> list[np.ndarray]:
    """Up to ``limit`` ROIs of ``image`` lying wholly inside ``mask``, each minus its least-squares quadratic."""
    basis = _quadratic_basis(size)
    pinv = np.linalg.pinv(basis)
    out = []
    h, w = mask.shape
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            if mask[y:y + size, x:x + size].all():
                roi = image[y:y + size, x:x + size].astype(np.float64).reshape(-1)
                out.append((roi - basis @ (pinv @ roi)).reshape(size, size))
                if len(out) >= limit:
                    return out
    return out


def nps_2d(rois: Sequence[np.ndarray], pixel_mm: float) -> np.ndarray:
    """Mean 2-D NPS (HU^2 mm^2) of detrended ROIs, zero frequency at [0, 0]."""
    stack = np.stack(rois)
    n = stack.shape[-1]
    return (np.abs(np.fft.fft2(stack)) ** 2).mean(0) * pixel_mm * pixel_mm / (n * n)


def radial(nps: np.ndarray, pixel_mm: float, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    n = nps.shape[0]
    bins = min(bins, n // 2)  # no more rings than the ROI has frequencies
    f = np.fft.fftfreq(n, d=pixel_mm)
    fr = np.hypot(f[:, None], f[None, :])
    edges = np.linspace(0, 0.5 / pixel_mm, bins + 1)
    idx = np.digitize(fr.ravel(), edges) - 1
    keep = (idx >= 0) & (idx < bins)
    total = np.bincount(idx[keep], nps.ravel()[keep], bins)
    count = np.bincount(idx[keep], minlength=bins)
    return 0.5 * (edges[1:] + edges[:-1]), np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_frequency(nps: np.ndarray, pixel_mm: float) -> float:
    n = nps.shape[0]
    f = np.fft.fftfreq(n, d=pixel_mm)
    fr = np.hypot(f[:, None], f[None, :])
    return float((fr * nps).sum() / max(nps.sum(), 1e-20))


def anisotropy(nps: np.ndarray) -> float:
    """NPS power with |fx| > |fy| over power with |fy| > |fx| (1: isotropic; < 1: streaks running along x, whose
    noise varies along y)."""
    n = nps.shape[0]
    f = np.fft.fftfreq(n)
    fx, fy = np.abs(f[None, :]), np.abs(f[:, None])
    return float(nps[fx > fy].sum() / max(nps[fy > fx].sum(), 1e-20))


def noise_stats(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], pixel_mm: float,
                roi: int = ROI) -> dict[str, Any]:
    """Noise SD, NPS (2-D and radial), mean frequency and anisotropy of images over their flat masks (``roi``-sized
    detrended ROIs)."""
    from training.noise import noise_sd

    rois = [r for img, m in zip(images, masks) for r in detrended_rois(img, m, size=roi, stride=max(4, roi // 3))]
    sds = [noise_sd(img, torch.from_numpy(m)) for img, m in zip(images, masks) if m.any()]
    out: dict[str, Any] = {"rois": len(rois), "sd_hu": float(np.median(sds)) if sds else float("nan")}
    if len(rois) >= 2:
        p = nps_2d(rois, pixel_mm)
        out.update(nps=p, radial=radial(p, pixel_mm), mean_freq=mean_frequency(p, pixel_mm),
                   anisotropy=anisotropy(p))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def _flat(img: np.ndarray) -> np.ndarray:
    from training.evaluate import body_mask
    from training.noise import flat_mask

    return flat_mask(img).numpy() & body_mask(img)


def group_slices(folder: str, kernel_name: str, axial_only: bool,
                 max_slices: int = 6) -> tuple[list[np.ndarray], float]:
    """Slices of the real series in ``folder`` reconstructed with ``kernel_name`` (axial only if asked)."""
    import pydicom

    from training.data import read_series, resolve_data_path

    root = resolve_data_path(folder)
    slices: list[np.ndarray] = []
    pixel = []
    for series in read_series(root):
        # read_series does not keep headers: find the kernel from one file of the series
        kernels: set[str] = set()
        image_type: list[str] = []
        for f in sorted(Path(series.source).rglob("*")):
            if not f.is_file():
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID",
                                                                                  "ConvolutionKernel", "ImageType"])
            except Exception:  # noqa: BLE001 - DIRFILE and the like
                continue
            if str(ds.get("SeriesInstanceUID")) == series.uid:
                kernels.add(str(ds.get("ConvolutionKernel", "")))
                image_type = [str(v) for v in ds.get("ImageType", [])]
                break
        if kernel_name not in kernels:
            continue
        if axial_only and "AXIAL" not in image_type:
            continue
        n = len(series.volume)
        for i in np.unique(np.linspace(0.25 * (n - 1), 0.75 * (n - 1), min(n, max_slices)).round().astype(int)):
            slices.append(series.volume[i])
            pixel.append(series.pixel_mm)
    return slices, float(np.median(pixel)) if pixel else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Simulation helpers
# ---------------------------------------------------------------------------------------------------------------


def water_ellipse(size: int, pixel_mm: float, axes_mm: tuple[float, float] = (320.0, 220.0)) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    x = (xx - (size - 1) / 2) * pixel_mm / (axes_mm[0] / 2)
    y = (yy - (size - 1) / 2) * pixel_mm / (axes_mm[1] / 2)
    return torch.from_numpy(np.where(x * x + y * y < 1, 0.0, -1000.0).astype(np.float32))


def simulated_mean_frequency(cutoff_per_mm: float, pixel_mm: float, seed: int = 0, window: int = 128,
                             fbp_window: str = "hann") -> float:
    """Mean NPS frequency of simulated noise (``fbp_window`` with cutoff ``cutoff_per_mm``) in the centre of a
    water ellipse."""
    from training.noise import CTNoiseSimulator, Kernel, ParallelBeam

    size = 512
    c = Kernel("probe", cutoff_per_mm).cutoff_fraction(pixel_mm)
    sim = CTNoiseSimulator(ParallelBeam(n_views=360, window=fbp_window, cutoff=c), electronic_sd=0.0)
    hu = water_ellipse(size, pixel_mm, (min(320.0, 0.9 * size * pixel_mm), min(220.0, 0.6 * size * pixel_mm)))
    gen = torch.Generator().manual_seed(seed)
    p = sim.line_integrals(hu, pixel_mm)
    y0 = x0 = (size - window) // 2
    rois = []
    for _ in range(2):
        n = sim.full_dose_noise(hu, pixel_mm, 1e5, gen, p=p, roi=(y0, x0, window, window)).numpy()
        rois += detrended_rois(n, np.ones_like(n, bool))
    return mean_frequency(nps_2d(rois, pixel_mm), pixel_mm)


def match_cutoff(target_freq: float, pixel_mm: float, grid: Sequence[float]) -> tuple[str, float, list]:
    """``(window, cutoff cycles/mm, curve)`` whose simulated mean NPS frequency is ``target_freq``: a Hann cutoff
    interpolated on ``grid``, or, when the target is sharper than a Hann window at full bandwidth can be, the
    nearest of the cosine, Shepp-Logan and ramp windows at full bandwidth."""
    curve = [("hann", c, simulated_mean_frequency(c, pixel_mm)) for c in grid]
    fs = np.array([f for _, _, f in curve])
    if target_freq <= fs.max():
        cs = np.array([c for _, c, _ in curve])
        order = np.argsort(fs)
        return "hann", float(np.interp(target_freq, fs[order], cs[order])), curve
    sharper = [(w, 2.0, simulated_mean_frequency(2.0, pixel_mm, fbp_window=w))
               for w in ("cosine", "shepp-logan", "ramp")]
    curve += sharper
    w, c, _ = min(sharper, key=lambda t: abs(t[2] - target_freq))
    return w, c, curve


def body_simulator(kernel_name: str, pixel_mm: float, tcm: float = 0.5, bowtie_edge: float = 0.15,
                   fov_mm: float = 500.0, electronic_sd: float = 10.0):
    from training.noise import CTNoiseSimulator, ParallelBeam, kernel

    k = kernel(kernel_name)
    return CTNoiseSimulator(
        ParallelBeam(n_views=360, window=k.window, cutoff=k.cutoff_fraction(pixel_mm)),
        electronic_sd=electronic_sd, bowtie_edge=bowtie_edge, bowtie_fov_mm=fov_mm, tcm_strength=tcm,
        electronic_model="variance")


def calibrate(sim, slices: Sequence[np.ndarray], masks: Sequence[np.ndarray], pixel_mm: float,
              target_sd: float, seed: int = 0) -> float:
    from training.noise import calibrate_flux

    flux, _ = calibrate_flux(sim, list(slices), pixel_mm, target_sd, [torch.from_numpy(m) for m in masks],
                             iterations=0, seed=seed)
    return float(flux)


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------


def check_kernels(report: dict, grid: Sequence[float]) -> None:
    rows = []
    for label, kname, folder in KERNEL_GROUPS:
        axial_only = "axial" in label
        slices, pixel = group_slices(folder, kname, axial_only)
        if not slices:
            LOGGER.warning("no slices for %s", label)
            continue
        stats = noise_stats(slices, [_flat(s) for s in slices], pixel)
        if "mean_freq" not in stats:
            rows.append({"group": label, "kernel": kname, "slices": len(slices), "pixel_mm": pixel,
                         "rois": stats["rois"], "sd_hu": stats["sd_hu"]})
            continue
        fbp_window, cutoff, curve = match_cutoff(stats["mean_freq"], pixel, grid)
        rows.append({"group": label, "kernel": kname, "slices": len(slices), "pixel_mm": round(pixel, 3),
                     "rois": stats["rois"], "sd_hu": round(stats["sd_hu"], 2),
                     "nps_mean_freq": round(stats["mean_freq"], 4), "anisotropy": round(stats["anisotropy"], 3),
                     "matched_window": fbp_window, "matched_cutoff_per_mm": round(cutoff, 3),
                     "curve": [(w, round(c, 3), round(f, 4)) for w, c, f in curve], "radial": stats["radial"]})
        LOGGER.info("%s: NPS mean %.3f c/mm -> %s cutoff %.2f c/mm", label, stats["mean_freq"], fbp_window, cutoff)
    report["kernels"] = rows


def _dose_and_thickness(folder: str) -> tuple[float | None, float | None]:
    from training.calibration import _dose_and_thickness as read
    from training.data import resolve_data_path

    return read(resolve_data_path(folder))


def _pair_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / sqrt(2)``: two neighbouring slices of a phantom whose inserts run along z cancel their
    structure and keep the noise of one slice (independent noise, same variance)."""
    return ((a.astype(np.float64) - b.astype(np.float64)) / math.sqrt(2.0)).astype(np.float32)


def check_phantom(report: dict, seed: int = 0) -> None:
    """The phantom pair, measured on differences of neighbouring slices (the inserts run along z): real noise of
    each series against the high-dose series plus simulated noise at the low-dose series' relative dose."""
    from training.calibration import _flat_slices
    from training.data import read_one_series, resolve_data_path

    gen = torch.Generator().manual_seed(seed)

    def pairs(series, count):
        out = []
        for i, m in _flat_slices(series, count):
            j = i + 1 if i + 1 < len(series.volume) else i - 1
            out.append((i, j, m.numpy() & _flat(series.volume[j])))
        return out

    high = read_one_series(resolve_data_path(PHANTOM_HIGH))
    hpairs = pairs(high, 2)
    hmasks = [m for _, _, m in hpairs]
    high_stats = noise_stats([_pair_difference(high.volume[i], high.volume[j]) for i, j, _ in hpairs], hmasks,
                             high.pixel_mm, PHANTOM_ROI)
    sim = body_simulator("philips-ub", high.pixel_mm, tcm=0.0, bowtie_edge=0.3, fov_mm=250.0)
    flux = calibrate(sim, [high.volume[i] for i, _, _ in hpairs], hmasks, high.pixel_mm, high_stats["sd_hu"], seed)
    ctdi_h, thick_h = _dose_and_thickness(PHANTOM_HIGH)
    rows = [{"series": high.name, "relative_dose": 1.0, "real_sd_hu": round(high_stats["sd_hu"], 2),
             "flux_I0": float(f"{flux:.4g}"), "real_nps_mean_freq": round(high_stats.get("mean_freq", math.nan), 4)}]
    curves = {"high dose 2.5 mm (real)": high_stats.get("radial")}
    for folder in PHANTOM_LOWS:
        low = read_one_series(resolve_data_path(folder))
        lpairs = pairs(low, 3)
        low_stats = noise_stats([_pair_difference(low.volume[i], low.volume[j]) for i, j, _ in lpairs],
                                [m for _, _, m in lpairs], low.pixel_mm, PHANTOM_ROI)
        ctdi_l, thick_l = _dose_and_thickness(folder)
        d = (ctdi_l * thick_l) / (ctdi_h * thick_h) if (ctdi_l and ctdi_h and thick_l and thick_h) else math.nan
        diffs = []
        for i, j, _ in hpairs:
            noisy = []
            for k in (i, j):
                t = torch.from_numpy(high.volume[k])
                noisy.append((t + sim.added_noise(t, high.pixel_mm, flux, d, gen)).numpy() if d < 1 else high.volume[k])
            diffs.append(_pair_difference(*noisy))
        sim_stats = noise_stats(diffs, hmasks, high.pixel_mm, PHANTOM_ROI)
        rows.append({"series": low.name, "relative_dose": round(d, 4), "real_sd_hu": round(low_stats["sd_hu"], 2),
                     "simulated_sd_hu": round(sim_stats["sd_hu"], 2),
                     "real_nps_mean_freq": round(low_stats.get("mean_freq", math.nan), 4),
                     "simulated_nps_mean_freq": round(sim_stats.get("mean_freq", math.nan), 4)})
        label = Path(folder).name.replace("philips-head-phantom-", "")
        curves[f"{label} (real)"] = low_stats.get("radial")
        curves[f"{label} (simulated from high dose, d={d:.2f})"] = sim_stats.get("radial")
    report["phantom"] = rows
    report["_phantom_curves"] = curves


def check_pelvis(report: dict, seed: int = 0) -> None:
    from training.data import NoiseSettings, ct_simulator, read_one_series, resolve_data_path

    gen = torch.Generator().manual_seed(seed)
    pelvis = read_one_series(resolve_data_path(PELVIS))
    n = len(pelvis.volume)
    picks = [int(i) for i in np.linspace(0.4 * (n - 1), 0.6 * (n - 1), 2).round()]
    slices = [pelvis.volume[i] for i in picks]
    masks = [_flat(s) for s in slices]
    real = noise_stats(slices, masks, pelvis.pixel_mm)
    rows = [{"noise": "real (60 mA scan)", "sd_hu": round(real["sd_hu"], 2),
             "nps_mean_freq": round(real["mean_freq"], 4), "anisotropy": round(real["anisotropy"], 3)}]
    curves = {"real 60 mA": real["radial"]}
    sims = {
        "original head simulator (Hann 1.0, no bowtie/TCM)": ct_simulator(NoiseSettings(cutoff=1.0)),
        "body simulator, no TCM": body_simulator("sharp", pelvis.pixel_mm, tcm=0.0),
        "body simulator (bowtie, TCM 0.5, electronic, sharp)": body_simulator("sharp", pelvis.pixel_mm),
    }
    example = {}
    for label, sim in sims.items():
        flux = calibrate(sim, slices, masks, pelvis.pixel_mm, real["sd_hu"], seed)
        noise = [sim.full_dose_noise(torch.from_numpy(s), pelvis.pixel_mm, flux, gen).numpy() for s in slices]
        st = noise_stats(noise, masks, pelvis.pixel_mm)
        rows.append({"noise": label, "flux_I0": float(f"{flux:.4g}"), "sd_hu": round(st["sd_hu"], 2),
                     "nps_mean_freq": round(st["mean_freq"], 4), "anisotropy": round(st["anisotropy"], 3)})
        curves[label] = st["radial"]
        example[label] = noise[-1]
    report["pelvis"] = rows
    report["_pelvis_curves"] = curves
    report["_pelvis_example"] = (slices[-1], example)


def check_range(report: dict, seed: int = 0, window: int = 160, max_sd: float = 150.0) -> None:
    """Input noise SD over kernels x doses on held-out body slices (flux calibrated on each slice's own SD), as
    simulated and as training draws it with ``noise.noise_sd_max = max_sd``."""
    from training.noise import KERNELS, limit_noise_sd, noise_sd
    from training.splits import load_split

    gen = torch.Generator().manual_seed(seed)
    split = load_split("ct")
    slices = []
    for folder in split.folders("validation"):
        if "covid" not in folder:
            continue
        for s, pix in [group_slices(folder, "STANDARD", axial_only=True, max_slices=1)]:
            slices += [(img, pix) for img in s[:1]]
    rows = []
    for img, pix in slices[:2]:
        mask = _flat(img)
        own = noise_sd(img, torch.from_numpy(mask))
        h, w = img.shape
        roi = ((h - window) // 2, (w - window) // 2, window, window)
        m_roi = mask[roi[0]:roi[0] + window, roi[1]:roi[1] + window]
        t = torch.from_numpy(img)
        # The slice's own dose: calibrated with the kernel matched to its scanner (GE STANDARD body).
        flux = calibrate(body_simulator("ge-standard", pix), [img], [mask], pix, own, seed)
        p = body_simulator("ge-standard", pix).line_integrals(t, pix)
        for kname in KERNELS:
            sim = body_simulator(kname, pix)
            for d in DOSES:
                added = sim.added_noise(t, pix, flux, d, gen, p=p, roi=roi)
                clean = t[roi[0]:roi[0] + window, roi[1]:roi[1] + window]
                capped, _ = limit_noise_sd(added, clean, own, max_sd)
                sd, sd_capped = (noise_sd((clean + a).numpy(), torch.from_numpy(m_roi)) if m_roi.any() else math.nan
                                 for a in (added, capped))
                rows.append({"kernel": kname, "dose": d, "own_sd_hu": round(own, 2), "input_sd_hu": round(sd, 2),
                             "input_sd_capped_hu": round(sd_capped, 2)})
    report["range"] = rows


# ---------------------------------------------------------------------------------------------------------------
# Figure and main
# ---------------------------------------------------------------------------------------------------------------


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9.5))
    a = ax[0, 0]
    for label, curve in report.get("_phantom_curves", {}).items():
        if curve is not None:  # the zero-frequency bin is removed by the detrending
            a.plot(curve[0][1:], curve[1][1:], "--" if "simulated" in label else "-", label=label)
    a.set_title("Philips head phantom: NPS of neighbouring-slice differences,\nreal vs simulated from the high dose",
                fontsize=10)
    a.set_xlabel("spatial frequency (cycles/mm)")
    a.set_ylabel("NPS (HU$^2$ mm$^2$)")
    a.set_yscale("log")
    a.legend(fontsize=7)

    a = ax[0, 1]
    for label, curve in report.get("_pelvis_curves", {}).items():
        a.plot(curve[0][1:], curve[1][1:], "-" if label.startswith("real") else "--", label=label)
    a.set_title("Real 60 mA pelvis: NPS, real vs simulated (flux calibrated to its SD)", fontsize=10)
    a.set_xlabel("spatial frequency (cycles/mm)")
    a.set_yscale("log")
    a.legend(fontsize=7)

    a = ax[0, 2]
    rows = [r for r in report.get("kernels", []) if "nps_mean_freq" in r]
    for i, r in enumerate(rows):
        a.scatter([i], [r["nps_mean_freq"]], color="k")
        a.annotate(f"{r['matched_window']} {r['matched_cutoff_per_mm']:.2f}", (i, r["nps_mean_freq"]), fontsize=7,
                   xytext=(3, 3), textcoords="offset points")
    a.set_xticks(range(len(rows)))
    a.set_xticklabels([r["group"].split(" (")[0] for r in rows], rotation=35, ha="right", fontsize=7)
    a.set_ylabel("NPS mean frequency (cycles/mm)")
    a.set_title("Real kernels: NPS mean frequency (label: matched window, cutoff c/mm)", fontsize=10)

    ex = report.get("_pelvis_example")
    if ex:
        img, noises = ex
        h, w = img.shape
        c = (slice(h // 2 - 96, h // 2 + 96), slice(w // 2 - 128, w // 2 + 128))
        a = ax[1, 0]
        a.imshow(img[c], cmap="gray", vmin=-10, vmax=90)
        a.set_title("real 60 mA pelvis (W100/L40)")
        a.axis("off")
        for a, noise in zip((ax[1, 1],), [v for k, v in noises.items() if "TCM 0.5" in k]):
            smooth = _smooth_like(img)
            a.imshow((smooth + noise)[c], cmap="gray", vmin=-10, vmax=90)
            a.set_title("smoothed pelvis + simulated noise of its dose\n(body simulator, same SD)", fontsize=9)
            a.axis("off")

    a = ax[1, 2]
    rng = report.get("range", [])
    for i, kname in enumerate(dict.fromkeys(r["kernel"] for r in rng)):
        for key, style in (("input_sd_hu", ":"), ("input_sd_capped_hu", "-")):
            pts: dict[float, list[float]] = {}
            for r in rng:
                if r["kernel"] == kname:
                    pts.setdefault(r["dose"], []).append(r[key])
            doses = sorted(pts)
            a.plot(doses, [np.median(pts[d]) for d in doses], style, marker="o", color=f"C{i}",
                   label=kname if style == "-" else None)
    a.axhspan(5, 150, color="0.9", zorder=0)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("dose fraction")
    a.set_ylabel("input noise SD (HU)")
    a.set_title("Held-out body slices: input noise SD per kernel\n(dotted: as simulated; solid: capped at 150 HU "
                "as training draws it; grey 5-150)", fontsize=9)
    a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _smooth_like(img: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.median_filter(img, size=7).astype(np.float32)


def _printable(report: dict) -> dict:
    out = {}
    for k, v in report.items():
        if k.startswith("_"):
            continue
        if k == "kernels":
            v = [{kk: vv for kk, vv in r.items() if kk not in ("radial",)} for r in v]
        out[k] = v
    return out


def run(figure_path: Path | None, json_path: Path | None, grid: Sequence[float], seed: int = 0,
        parts: Sequence[str] = ("kernels", "phantom", "pelvis", "range")) -> dict:
    report: dict = {}
    if "kernels" in parts:
        check_kernels(report, grid)
    if "phantom" in parts:
        check_phantom(report, seed)
    if "pelvis" in parts:
        check_pelvis(report, seed)
    if "range" in parts:
        check_range(report, seed)
    if figure_path is not None:
        figure(report, figure_path)
    text = json.dumps(_printable(report), indent=1, default=float)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.noise_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--figure", type=Path, default=Path("docs/images/ct-noise-simulation-check.png"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--parts", nargs="*", default=["kernels", "phantom", "pelvis", "range"])
    p.add_argument("--grid", type=float, nargs="*", default=[0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8],
                   help="Hann cutoffs (cycles/mm) tried when matching a kernel")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    report = run(args.figure, args.json, args.grid, parts=args.parts)
    printable = _printable(report)
    for key in ("kernels", "phantom", "pelvis"):
        for row in printable.get(key, []):
            print(key, {k: v for k, v in row.items() if k != "curve"})
    rng = printable.get("range", [])
    if rng:
        sds = [r["input_sd_hu"] for r in rng if math.isfinite(r["input_sd_hu"])]
        capped = [r["input_sd_capped_hu"] for r in rng if math.isfinite(r["input_sd_capped_hu"])]
        print(f"range: input noise SD {min(sds):.1f}-{max(sds):.1f} HU as simulated, {min(capped):.1f}-"
              f"{max(capped):.1f} HU capped (noise_sd_max 150) over kernels x doses {DOSES}")
        for r in rng:
            print("range", r)
    print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
