"""Low-contrast detectability: does a denoiser keep small, faint lesions visible?

Discs of ``diameter_mm`` and ``contrast_hu`` (3-10 mm, 3-20 HU) are inserted into flat tissue of a real CT slice
*before* the noise is simulated (the line integrals of the slice with the discs are projected, so the noise is that
of a scan of the lesion), and the slice without them is the signal-absent case. For every dose, ``realisations``
independent noise fields of a scan at that fraction of the slice's own dose are made in the projection domain
(:class:`training.noise.CTNoiseSimulator`, flux self-calibrated on the slice; only a window around each disc is
reconstructed, which is what makes hundreds of realisations affordable), the noisy windows are denoised, and a
model observer scores signal-present against signal-absent windows.

The observer is the non-prewhitening matched filter (NPW) with the known signal as its template: the score of a
window ``g`` is ``sum(s * g)`` over a square ROI around the disc, ``s`` the inserted disc. Its detectability is
``d' = (mean score present - mean score absent) / sqrt((var present + var absent) / 2)``. A denoiser that lowers
the noise raises d'; one that also blurs or erases the disc lowers the signal the template finds, and d' with it.
The same noise realisations feed the input (filtered back-projection) and the denoiser, so the ratio
``d'_model / d'_input`` is paired; its 95 % confidence interval comes from a bootstrap over realisations
(present and absent resampled independently, the same indices for input and model).

Insert contrast: the mean over the disc (pixels at least half covered) of ``mean present - mean absent``, over the
mean inserted value there, for the input (about 1: FBP is linear) and the model, and the model's relative to the
input's. The issue's acceptance: at every dose from
10 % to 100 %, the lower confidence bound of the d' ratio at least 0.95, and the model's contrast at least 0.8 of
the truth.

The slice itself is the fixed background of every realisation: its own (real) noise is the same in every one, so
it does not enter the observer's variance; the noise of "dose d" is simulated in full on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

#: A denoiser for this test: a batch of HU windows ``(n, h, w)`` in, the same shape out.
Denoiser = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Insert:
    """One disc: diameter (mm) and contrast (HU above the background)."""

    diameter_mm: float
    contrast_hu: float

    @property
    def label(self) -> str:
        return f"{self.diameter_mm:g} mm / {self.contrast_hu:g} HU"


@dataclass
class LCDSettings:
    """How the low-contrast detectability test is run (``dicom-node evaluate --detectability``).

    Attributes
    ----------
    inserts
        ``(diameter mm, contrast HU)`` of each disc; all discs of a slice are inserted at once, in separate
        flat regions.
    doses
        Dose fractions of the slice's own dose.
    realisations
        Noise realisations per dose, each giving one signal-present and one signal-absent window per disc
        (independent noise for the two).
    window_px
        Side of the window reconstructed and denoised around each disc (context for the network).
    roi_mm
        Side of the observer's square ROI around a disc (at least the disc plus a margin).
    kernel, tcm_strength, bowtie_edge, electronic_sd
        The noise physics (:class:`training.noise.CTNoiseSimulator`, :data:`training.noise.KERNELS`).
    bootstrap
        Bootstrap resamples for the confidence intervals.
    """

    inserts: list[Insert] = field(default_factory=lambda: [Insert(3.0, 20.0), Insert(5.0, 10.0),
                                                           Insert(10.0, 5.0), Insert(10.0, 3.0)])
    doses: tuple[float, ...] = (0.1, 0.25, 0.55, 1.0)
    realisations: int = 100
    window_px: int = 64
    roi_mm: float = 16.0
    kernel: str = "ge-standard"
    tcm_strength: float = 0.5
    bowtie_edge: float = 0.15
    electronic_sd: float = 10.0
    bootstrap: int = 2000
    seed: int = 4321
    min_ratio_lower: float = 0.95
    min_contrast: float = 0.8


def disc(shape: tuple[int, int], centre: tuple[float, float], diameter_px: float, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by a disc (anti-aliased by ``supersample`` x ``supersample`` points)."""
    h, w = shape
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    yy = np.arange(h)[:, None, None, None] + offs[None, None, :, None]
    xx = np.arange(w)[None, :, None, None] + offs[None, None, None, :]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= (diameter_px / 2) ** 2
    return inside.mean(axis=(2, 3))


def place_windows(flat: np.ndarray, count: int, window: int, margin: int = 2) -> list[tuple[int, int]]:
    """Centres of ``count`` non-overlapping windows, each in the flat region, deepest inside it first."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(flat)
    half = window // 2
    depth[:half, :] = depth[-half:, :] = 0
    depth[:, :half] = depth[:, -half:] = 0
    centres = []
    for _ in range(count):
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if depth[y, x] <= 0:
            break
        centres.append((int(y), int(x)))
        depth[max(0, y - window - margin):y + window + margin, max(0, x - window - margin):x + window + margin] = 0
    return centres


def npw_scores(windows: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Scores ``sum(template * window)`` of a stack of windows."""
    return np.tensordot(windows.astype(np.float64), template.astype(np.float64), axes=([1, 2], [0, 1]))


def dprime(present: np.ndarray, absent: np.ndarray) -> float:
    pooled = math.sqrt(0.5 * (float(np.var(present, ddof=1)) + float(np.var(absent, ddof=1))))
    return float((present.mean() - absent.mean()) / pooled) if pooled > 0 else float("nan")


def _ci(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def score(present: dict[str, np.ndarray], absent: dict[str, np.ndarray], signal: np.ndarray, roi: np.ndarray,
          contrast_hu: float, bootstrap: int, rng: np.random.Generator) -> dict[str, Any]:
    """d', contrast and their ratios (with bootstrap 95 % intervals) of ``model`` against ``input``.

    Parameters
    ----------
    present, absent
        ``{"input": windows, "model": windows}``, each ``(realisations, h, w)`` in HU.
    signal
        The inserted disc (HU) in the window; its ROI part is the observer's template.
    roi
        Boolean mask of the observer's ROI in the window.
    """
    ys, xs = np.where(roi)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    template = signal[sl]
    in_disc = signal[sl] > 0.5 * contrast_hu
    truth = float(template[in_disc].mean())  # the inserted contrast over those pixels (edges partly covered)
    out: dict[str, Any] = {}
    scores = {}
    contrast_mean = {}
    for method in ("input", "model"):
        p, a = present[method][:, sl[0], sl[1]], absent[method][:, sl[0], sl[1]]
        scores[method] = (npw_scores(p, template), npw_scores(a, template))
        diff = p.mean(0) - a.mean(0)
        contrast_mean[method] = float(diff[in_disc].mean() / truth)
        out[f"dprime_{method}"] = dprime(*scores[method])
        out[f"contrast_{method}"] = contrast_mean[method]
    out["dprime_ratio"] = out["dprime_model"] / out["dprime_input"] if out["dprime_input"] else float("nan")
    out["contrast_ratio_to_input"] = (contrast_mean["model"] / contrast_mean["input"] if contrast_mean["input"]
                                      else float("nan"))
    n_p, n_a = len(scores["input"][0]), len(scores["input"][1])
    boot = {k: np.empty(bootstrap) for k in ("dprime_input", "dprime_model", "dprime_ratio")}
    for b in range(bootstrap):
        ip, ia = rng.integers(n_p, size=n_p), rng.integers(n_a, size=n_a)
        d_in = dprime(scores["input"][0][ip], scores["input"][1][ia])
        d_mo = dprime(scores["model"][0][ip], scores["model"][1][ia])
        boot["dprime_input"][b], boot["dprime_model"][b] = d_in, d_mo
        boot["dprime_ratio"][b] = d_mo / d_in if d_in else np.nan
    for k, v in boot.items():
        out[f"{k}_ci95"] = _ci(v)
    # Contrast: bootstrap of the realisation means as well.
    cboot = np.empty(bootstrap)
    p_m, a_m = present["model"][:, sl[0], sl[1]], absent["model"][:, sl[0], sl[1]]
    for b in range(bootstrap):
        ip, ia = rng.integers(n_p, size=n_p), rng.integers(n_a, size=n_a)
        cboot[b] = (p_m[ip].mean(0) - a_m[ia].mean(0))[in_disc].mean() / truth
    out["contrast_model_ci95"] = _ci(cboot)
    return out


def simulator_for(settings: LCDSettings, pixel_mm: float):
    from training.noise import CTNoiseSimulator, ParallelBeam, kernel

    k = kernel(settings.kernel)
    return CTNoiseSimulator(
        ParallelBeam(n_views=360, window=k.window, cutoff=k.cutoff_fraction(pixel_mm)),
        electronic_sd=settings.electronic_sd, bowtie_edge=settings.bowtie_edge, tcm_strength=settings.tcm_strength,
        electronic_model="variance")


def run_slice(image: np.ndarray, pixel_mm: float, denoise: Denoiser, settings: LCDSettings,
              flux: float | None = None, progress: Callable[[str], None] | None = None,
              name: str = "slice") -> dict[str, Any]:
    """The detectability test on one real slice (HU): one row per dose and insert.

    Parameters
    ----------
    image
        The slice (HU), the fixed background.
    denoise
        Batch of HU windows in, denoised HU windows out.
    flux
        ``I0`` of the slice's own dose; self-calibrated on the slice's flat-region noise when ``None``.
    """
    from training.noise import calibrate_flux, flat_mask, noise_sd

    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    sim = simulator_for(settings, pixel_mm)
    hu = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    flat = flat_mask(image).numpy()
    win = settings.window_px
    centres = place_windows(flat, len(settings.inserts), win)
    if len(centres) < len(settings.inserts):
        raise ValueError(f"{name}: room for only {len(centres)} of {len(settings.inserts)} inserts in flat tissue")
    if flux is None:
        own = noise_sd(image, torch.from_numpy(flat))
        flux, _ = calibrate_flux(sim, [image], pixel_mm, own, [torch.from_numpy(flat)], iterations=0,
                                 seed=settings.seed)
    # The discs, inserted before the noise is simulated.
    with_discs = image.astype(np.float32).copy()
    signals, rois, windows = [], [], []
    roi_half = max(2, int(round(settings.roi_mm / pixel_mm / 2)))
    for ins, (cy, cx) in zip(settings.inserts, centres):
        y0, x0 = cy - win // 2, cx - win // 2
        window_disc = disc((win, win), (win / 2 - 0.5, win / 2 - 0.5), ins.diameter_mm / pixel_mm) * ins.contrast_hu
        with_discs[y0:y0 + win, x0:x0 + win] += window_disc.astype(np.float32)
        roi = np.zeros((win, win), bool)
        half = max(roi_half, int(math.ceil(ins.diameter_mm / pixel_mm / 2)) + 2)
        roi[win // 2 - half:win // 2 + half, win // 2 - half:win // 2 + half] = True
        signals.append(window_disc)
        rois.append(roi)
        windows.append((y0, x0, win, win))
    p_absent = sim.line_integrals(hu, pixel_mm)
    p_present = sim.line_integrals(torch.from_numpy(with_discs), pixel_mm)
    scale = 1000.0 / sim.mu_water
    rows = []
    for dose in settings.doses:
        if progress:
            progress(f"{name}: detectability at dose {dose:g}, {settings.realisations} realisations")
        noisy: dict[str, list[list[np.ndarray]]] = {"present": [[] for _ in windows], "absent": [[] for _ in windows]}
        for _ in range(settings.realisations):
            for case, p, base in (("present", p_present, with_discs), ("absent", p_absent, image)):
                delta = sim.projection_noise(p, flux * dose, 1.0, gen, pixel_mm)
                q = sim.geometry.filter(delta, pixel_mm)
                for k, (y0, x0, h, w) in enumerate(windows):
                    noise = sim.geometry.backproject(q, tuple(image.shape), pixel_mm, (y0, x0, h, w)) * scale
                    noisy[case][k].append(base[y0:y0 + h, x0:x0 + w] + noise.numpy())
        for k, ins in enumerate(settings.inserts):
            present_in = np.stack(noisy["present"][k]).astype(np.float32)
            absent_in = np.stack(noisy["absent"][k]).astype(np.float32)
            present = {"input": present_in, "model": np.asarray(denoise(present_in), np.float32)}
            absent = {"input": absent_in, "model": np.asarray(denoise(absent_in), np.float32)}
            row: dict[str, Any] = {
                "slice": name, "dose": dose, "diameter_mm": ins.diameter_mm, "contrast_hu": ins.contrast_hu,
                "realisations": settings.realisations,
                "input_noise_sd_hu": float(np.std(absent_in - absent_in.mean(0), ddof=1))}
            row.update(score(present, absent, signals[k], rois[k], ins.contrast_hu, settings.bootstrap, rng))
            row["dprime_kept"] = bool(row["dprime_ratio_ci95"][0] >= settings.min_ratio_lower)
            row["contrast_kept"] = bool(row["contrast_model"] >= settings.min_contrast)
            rows.append(row)
    return {"slice": name, "pixel_mm": pixel_mm, "flux_I0": float(f"{flux:.4g}"), "centres": centres, "rows": rows}


def network_denoiser(network: torch.nn.Module, normalization, batch: int = 64) -> Denoiser:
    """A :data:`Denoiser` running a model's network as the node does (input plus residual, fixed normalisation)."""
    from training.data import normalisation_params, to_network

    @torch.no_grad()
    def run(windows: np.ndarray) -> np.ndarray:
        out = np.empty_like(windows, dtype=np.float32)
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            params = normalisation_params(normalization, chunk[0])
            if normalization.mode != "fixed":
                raise ValueError("the detectability test runs CT models (fixed normalisation)")
            x = torch.from_numpy(to_network(chunk, params))[:, None]
            y = network(x).float()
            out[start:start + batch] = chunk + (y - x)[:, 0].numpy() * params[1]
        return out

    return run


def summarise(results: Sequence[dict[str, Any]], settings: LCDSettings) -> dict[str, Any]:
    """Per dose: the worst d' ratio lower bound and the lowest model contrast over inserts and slices."""
    per_dose: dict[float, dict[str, Any]] = {}
    for res in results:
        for row in res["rows"]:
            d = per_dose.setdefault(row["dose"], {"min_dprime_ratio_lower": math.inf, "min_contrast_model": math.inf,
                                                  "median_dprime_ratio": []})
            d["min_dprime_ratio_lower"] = min(d["min_dprime_ratio_lower"], row["dprime_ratio_ci95"][0])
            d["min_contrast_model"] = min(d["min_contrast_model"], row["contrast_model"])
            d["median_dprime_ratio"].append(row["dprime_ratio"])
    for d in per_dose.values():
        d["median_dprime_ratio"] = float(np.median(d["median_dprime_ratio"]))
        d["passes"] = bool(d["min_dprime_ratio_lower"] >= settings.min_ratio_lower
                           and d["min_contrast_model"] >= settings.min_contrast)
    return {"settings": {k: v for k, v in asdict(settings).items()}, "per_dose": per_dose,
            "passes": bool(per_dose) and all(d["passes"] for d in per_dose.values())}


def table_markdown(results: Sequence[dict[str, Any]]) -> str:
    """One line per slice, dose and insert."""
    header = ("| slice | dose | insert | input SD HU | d' input | d' model | d' ratio (95 % CI) | contrast input | "
              "contrast model (95 % CI) | kept |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lo, hi = r["dprime_ratio_ci95"]
            clo, chi = r["contrast_model_ci95"]
            lost = [what for what, ok in (("d'", r["dprime_kept"]), ("contrast", r["contrast_kept"])) if not ok]
            kept = "yes" if not lost else "no: " + " and ".join(lost)
            lines.append(f"| {r['slice']} | {r['dose']:g} | {r['diameter_mm']:g} mm {r['contrast_hu']:g} HU | "
                         f"{r['input_noise_sd_hu']:.1f} | {r['dprime_input']:.2f} | {r['dprime_model']:.2f} | "
                         f"{r['dprime_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r['contrast_input']:.2f} | "
                         f"{r['contrast_model']:.2f} ({clo:.2f}-{chi:.2f}) | {kept} |")
    return "\n".join(lines) + "\n"
