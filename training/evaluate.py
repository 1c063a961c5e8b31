"""Scoring a model folder on DICOM series, beside the noisy input and a classical baseline.

For a series with a reference (``data``), the input is the series at a simulated dose fraction (CT: projection-
domain noise with the flux self-calibrated on the series, fixed seed) and the reference is the series itself.
For a real low-dose series (``real_low_dose``) there is no reference: only the noise SD in flat regions, the
edge sharpness and the noise texture are measured.

Metrics (CT in HU; every mask is computed on the reference, or on the smoothed input when there is none, and
applied to every image compared):

``psnr``, ``ssim``
    CT: in the display window ``window`` (default W400/L40 = [-160, 240] HU): both images clipped to the window,
    data range = window width, over the body (the filled region above -500 HU); SSIM is skimage's (Gaussian
    weights, sigma 1.5) averaged over the body. MR and X-ray: no clipping, data range = the reference's 0.5-99.5
    percentile range, over the brighter half of the image (the object).
``rmse_hu``
    root mean square error in HU over the body (no clipping).
``bias_hu``, ``bias_max_region_hu``
    mean of (image - reference) over the flat regions, and the largest absolute mean over one connected flat
    region (of 200+ pixels).
``noise_sd_hu``
    median local SD (15x15) over the flat regions (:func:`training.noise.noise_sd`).
``edge_sharpness``
    mean gradient magnitude (HU/px, after a 1-px Gaussian) over the strongest edges of the reference (top 1% of
    its smoothed gradient in the body); compare an output with its input (ratio ``edge_ratio``).
``nps_mean_freq``, ``nps_distance``
    noise power spectrum of 32x32 flat-region ROIs (ROI mean removed): its mean spatial frequency (cycles/mm)
    and the L1 distance between its normalised shape and the reference's (the reference's own noise, or for a
    real low-dose series the noise of ``nps_reference``, e.g. the high-dose scan of the same phantom).

Figures show CT in a narrow window (100 HU wide around the flat regions' median HU, see :func:`display_window`)
so the noise is visible; the scoring window above is unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import Series, normalisation_params, read_series, resolve_data_path, to_network

LOGGER = logging.getLogger(__name__)

NPS_ROI = 32


# ---------------------------------------------------------------------------------------------------------------
# Running a network and the baseline
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def denoise_image(network: torch.nn.Module, image: np.ndarray, normalization, device="cpu") -> np.ndarray:
    """Denoise one physical image as the node does: input plus the network's residual, in physical units."""
    params = normalisation_params(normalization, image)
    x = torch.from_numpy(to_network(image, params))[None, None].to(device)
    y = network(x).float()
    return (image + (y - x)[0, 0].cpu().numpy() * params[1]).astype(np.float32)


def baseline_denoise(kind: str, image: np.ndarray, sigma: float, cache_dir: Path | None, key: str) -> np.ndarray:
    """BM3D (``bm3d`` package, white-noise sigma) or non-local means (scikit-image); cached on disk by ``key``."""
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(f"{kind}:{key}:{sigma:.4f}".encode()).hexdigest()[:20]
        path = cache_dir / f"{h}.npy"
        if path.exists():
            return np.load(path)
    if kind == "bm3d":
        import bm3d

        out = bm3d.bm3d(image.astype(np.float64), sigma_psd=float(sigma)).astype(np.float32)
    elif kind == "nlm":
        from skimage.restoration import denoise_nl_means

        out = denoise_nl_means(image.astype(np.float64), h=0.8 * sigma, sigma=sigma, fast_mode=True,
                               patch_size=5, patch_distance=6).astype(np.float32)
    else:
        raise ValueError(f"unknown baseline {kind!r} (bm3d, nlm, none)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def body_mask(reference: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    from scipy import ndimage

    m = ndimage.binary_fill_holes(reference > threshold)
    m = ndimage.binary_opening(m, iterations=2)
    return m if m.any() else np.ones_like(reference, bool)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x.astype(np.float64), sigma)


def edge_mask(reference_smooth: np.ndarray, body: np.ndarray, top: float = 1.0) -> np.ndarray:
    gy, gx = np.gradient(reference_smooth)
    g = np.hypot(gx, gy)
    vals = g[body]
    if vals.size == 0:
        return np.zeros_like(body)
    thr = np.percentile(vals, 100 - top)
    return body & (g >= thr) & (g > 20.0)


def edge_sharpness(image: np.ndarray, edges: np.ndarray) -> float:
    if not edges.any():
        return float("nan")
    gy, gx = np.gradient(_smooth(image, 1.0))
    return float(np.hypot(gx, gy)[edges].mean())


def psnr_ssim(image: np.ndarray, reference: np.ndarray, body: np.ndarray, window) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    if window is not None:
        lo, hi = window
    else:  # no window (MR, X-ray): the reference's 0.5-99.5 percentile range over the whole image
        lo, hi = np.percentile(reference, [0.5, 99.5])
    rng = float(hi - lo)
    a, b = np.clip(image, lo, hi), np.clip(reference, lo, hi)
    mse = float(np.mean((a[body] - b[body]) ** 2))
    psnr = 10 * math.log10(rng * rng / max(mse, 1e-12))
    _, smap = structural_similarity(a, b, data_range=rng, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    return psnr, float(smap[body].mean())


def flat_rois(mask: np.ndarray, size: int = NPS_ROI, stride: int = 16) -> list[tuple[int, int]]:
    out = []
    h, w = mask.shape
    for y in range(0, h - size + 1, stride):
        for x in range(0, w - size + 1, stride):
            if mask[y:y + size, x:x + size].all():
                out.append((y, x))
    return out


def nps(images: Sequence[np.ndarray], rois: Sequence[Sequence[tuple[int, int]]], pixel_mm: float,
        bins: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    from training.noise import noise_power_spectrum

    stack = [img[y:y + NPS_ROI, x:x + NPS_ROI] for img, rs in zip(images, rois) for y, x in rs]
    if len(stack) < 2:
        return None
    return noise_power_spectrum(np.stack(stack), pixel_mm, bins=bins)


def nps_summary(spectrum, reference_spectrum) -> dict[str, float]:
    if spectrum is None:
        return {}
    f, p = spectrum
    out = {"nps_mean_freq": float((f * p).sum() / max(p.sum(), 1e-20))}
    if reference_spectrum is not None:
        _, q = reference_spectrum
        out["nps_distance"] = float(np.abs(p / max(p.sum(), 1e-20) - q / max(q.sum(), 1e-20)).sum())
    return out


def region_biases(diff: np.ndarray, flat: np.ndarray, min_pixels: int = 200) -> list[float]:
    from scipy import ndimage

    labels, n = ndimage.label(flat)
    out = []
    for i in range(1, n + 1):
        m = labels == i
        if m.sum() >= min_pixels:
            out.append(float(diff[m].mean()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-series evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SeriesResult:
    name: str
    kind: str  # "simulated" or "real-low-dose"
    slices: list[int]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> metric -> value
    extra: dict[str, Any] = field(default_factory=dict)


def pick_slices(series: Series, max_slices: int) -> list[int]:
    n = len(series.volume)
    if series.modality == "CT":
        ok = [i for i in range(n) if (series.volume[i] > -500).mean() > 0.05]
    else:
        ok = list(range(n))
    ok = ok or list(range(n))
    if max_slices <= 0 or len(ok) <= max_slices:
        return ok
    idx = np.linspace(0, len(ok) - 1, max_slices + 2)[1:-1].round().astype(int)
    return [ok[i] for i in idx]


def _simulate_input(series: Series, slices: list[int], card_noise: dict, dose: float, seed: int,
                    fbp_cutoff: float | None = None):
    """Noisy inputs for ``slices`` and a description of the noise."""
    from training.data import NoiseSettings, calibrate_series_flux, ct_simulator

    gen = torch.Generator().manual_seed(seed)
    if series.modality == "CT":
        settings = NoiseSettings(kind="ct", seed=seed)
        for key in ("electronic_sd", "n_views", "window", "cutoff", "bowtie_edge", "bowtie_fov_mm", "tcm_strength",
                    "electronic_model"):
            if key in card_noise:
                setattr(settings, key, card_noise[key])
        if fbp_cutoff is not None:
            settings.cutoff = float(fbp_cutoff)
        flux, measured, simulated = calibrate_series_flux(series, settings)
        sim = ct_simulator(settings)
        noisy = [sim.simulate(torch.from_numpy(series.volume[k]), series.pixel_mm, flux, dose, gen).numpy()
                 for k in slices]
        return noisy, {"noise": "ct-projection", "dose_fraction": dose, "fbp_window": settings.window,
                       "fbp_cutoff": settings.cutoff, "flux": float(f"{flux:.4g}"),
                       "series_noise_sd_hu": round(measured, 3), "simulated_full_dose_sd_hu": round(simulated, 3)}
    from training.noise import poisson_gaussian, rician

    kind = card_noise.get("kind", "rician" if series.modality == "MR" else "poisson-gaussian")
    noisy = []
    for k in slices:
        img = torch.from_numpy(series.volume[k]).clamp(min=0)
        scale = float(np.percentile(series.volume[k], 99.5))
        if kind == "rician":
            sigma = float(np.mean(card_noise.get("sigma_range", [0.02, 0.08]))) * scale
            noisy.append(rician(img, sigma, gen).numpy())
        else:
            gain = float(np.mean(card_noise.get("gain_range", [0.002, 0.01]))) * scale
            sigma_e = float(np.mean(card_noise.get("sigma_range", [0.02, 0.08]))) * scale * 0.5
            noisy.append(poisson_gaussian(img, gain, sigma_e, gen).numpy())
    return noisy, {"noise": kind}


def _quiet(_message: str) -> None:
    """The default progress callback: say nothing."""


def evaluate_series(network, card, series: Series, dose: float, window, baseline: str, max_slices: int,
                    seed: int, cache_dir: Path | None, reference: Series | None = None,
                    real: bool = False, fbp_cutoff: float | None = None,
                    progress: Callable[[str], None] = _quiet) -> tuple[SeriesResult, dict[str, np.ndarray]]:
    """Score one series. ``real``: the series itself is the (real) noisy input and has no reference.

    ``progress`` is called with a short line before each step (the baseline, slow on a CPU, once per slice).
    """
    from training.noise import flat_mask, noise_sd

    slices = pick_slices(series, max_slices)
    if not real:
        progress(f"{series.name}: simulating dose {dose:g} on {len(slices)} slice(s)")
    is_ct = series.modality == "CT"
    win = tuple(window) if (is_ct and window) else None
    if real:
        inputs = [series.volume[k] for k in slices]
        refs = None
        info = {"input": "real series"}
    else:
        inputs, info = _simulate_input(series, slices, card.noise, dose, seed, fbp_cutoff)
        refs = [series.volume[k] for k in slices]
    progress(f"{series.name}: {card.name} on {len(inputs)} slice(s)")
    outputs = [denoise_image(network, x, card.normalization) for x in inputs]
    methods = {"input": inputs, "model": outputs}
    if baseline != "none":
        base = []
        for n, (k, x, r) in enumerate(zip(slices, inputs, refs or [None] * len(inputs)), 1):
            progress(f"{series.name}: {baseline} baseline, slice {n}/{len(inputs)}")
            if r is not None:
                body = body_mask(r) if is_ct else np.ones_like(r, bool)
                sigma = float(np.std((x - r)[body]))
            else:
                m = flat_mask(x) if is_ct else torch.zeros(x.shape, dtype=torch.bool)
                sigma = noise_sd(x, m) if bool(m.any()) else float(np.std(x - _smooth(x, 2.0)))
            key = f"{series.source}:{series.uid}:{k}:{'real' if real else dose}:{seed}:{fbp_cutoff}"
            base.append(baseline_denoise(baseline, x, sigma, cache_dir, key))
        methods[baseline] = base
    result = SeriesResult(series.name, "real-low-dose" if real else "simulated", slices, extra=info)
    progress(f"{series.name}: metrics")

    # Masks from the reference (or the smoothed real input).
    basis = refs if refs is not None else [_smooth(x, 2.0).astype(np.float32) for x in inputs]
    bodies = [body_mask(b) if is_ct else (b > np.percentile(b, 50)) for b in basis]
    flats = [flat_mask(b).numpy() & body if is_ct else np.zeros_like(body) for b, body in zip(basis, bodies)]
    edges = [edge_mask(_smooth(b, 1.5), body) for b, body in zip(basis, bodies)]
    rois = [flat_rois(f) for f in flats]
    ref_nps = None
    if refs is not None:
        ref_nps = nps(refs, rois, series.pixel_mm)
    elif reference is not None:
        ref_slices = pick_slices(reference, max_slices)
        rflats = [flat_mask(reference.volume[k]).numpy() for k in ref_slices]
        ref_nps = nps([reference.volume[k] for k in ref_slices], [flat_rois(f) for f in rflats], reference.pixel_mm)
    if ref_nps is not None:
        result.extra["reference_nps_mean_freq"] = nps_summary(ref_nps, None)["nps_mean_freq"]

    input_sharp = float(np.nanmean([edge_sharpness(x, e) for x, e in zip(inputs, edges)]))
    for method, images in methods.items():
        row: dict[str, float] = {}
        if refs is not None:
            ps = [psnr_ssim(i, r, b, win) for i, r, b in zip(images, refs, bodies)]
            row["psnr"] = float(np.mean([p for p, _ in ps]))
            row["ssim"] = float(np.mean([s for _, s in ps]))
            row["rmse"] = float(np.sqrt(np.mean(np.concatenate([((i - r)[b]) ** 2 for i, r, b in
                                                                 zip(images, refs, bodies)]))))
            if is_ct:
                diffs = [(i - r) for i, r in zip(images, refs)]
                fl = [d[f] for d, f in zip(diffs, flats) if f.any()]
                row["bias_hu"] = float(np.concatenate(fl).mean()) if fl else float("nan")
                regions = [b for d, f in zip(diffs, flats) for b in region_biases(d, f)]
                row["bias_max_region_hu"] = float(np.max(np.abs(regions))) if regions else float("nan")
        if is_ct:
            sds = [noise_sd(i, torch.from_numpy(f)) for i, f in zip(images, flats) if f.any()]
            row["noise_sd_hu"] = float(np.median(sds)) if sds else float("nan")
            sharp = float(np.nanmean([edge_sharpness(i, e) for i, e in zip(images, edges)]))
            row["edge_sharpness"] = sharp
            row["edge_ratio"] = sharp / input_sharp if input_sharp > 0 else float("nan")
            row.update(nps_summary(nps(images, rois, series.pixel_mm), ref_nps))
        result.rows[method] = row
    if refs is not None and is_ct:
        sds = [noise_sd(r, torch.from_numpy(f)) for r, f in zip(refs, flats) if f.any()]
        result.extra["reference_noise_sd_hu"] = float(np.median(sds)) if sds else float("nan")
    mid = len(slices) // 2
    middle = {m: v[mid] for m, v in methods.items()}
    if refs is not None:
        middle["reference"] = refs[mid]
    return result, middle


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------

_COLUMNS = ["psnr", "ssim", "rmse", "bias_hu", "bias_max_region_hu", "noise_sd_hu", "edge_sharpness", "edge_ratio",
            "nps_mean_freq", "nps_distance"]


def table_markdown(results: Sequence[SeriesResult]) -> str:
    lines = ["| series | input | method | " + " | ".join(_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(_COLUMNS)]
    for r in results:
        for method, row in r.rows.items():
            cells = [("" if c not in row or (isinstance(row[c], float) and math.isnan(row[c])) else f"{row[c]:.4g}")
                     for c in _COLUMNS]
            lines.append(f"| {r.name} | {r.kind} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def display_window(images: dict[str, np.ndarray], width: float = 100.0) -> tuple[float, float]:
    """A narrow CT display window in which the noise is visible: ``width`` HU around the median HU of the flat
    soft-tissue-like regions of the reference (or of the smoothed input), rounded to 10 HU; W80/L40 when there
    are none. The scoring window (W400/L40) shows the phantom's plastic inserts and brain tissue almost flat.
    """
    from training.noise import flat_mask

    basis = images.get("reference")
    if basis is None:
        basis = _smooth(images["input"], 2.0).astype(np.float32)
    flat = flat_mask(basis).numpy()
    if int(flat.sum()) < 200:
        return (0.0, 80.0)
    level = round(float(np.median(basis[flat])) / 10.0) * 10.0
    return (level - width / 2, level + width / 2)


def save_figure(path: Path, name: str, images: dict[str, np.ndarray], window) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(images.items())
    if "reference" in images:
        panels.append(("model - reference", images["model"] - images["reference"]))
    else:
        panels.append(("input - model", images["input"] - images["model"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    ref = images.get("reference", images["input"])
    lo, hi = window if window else np.percentile(ref, [0.5, 99.5])
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        if "-" in title:
            span = max(1e-6, float(np.percentile(np.abs(img), 99)))
            ax.imshow(img, cmap="gray", vmin=-span, vmax=span)
        else:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title if "-" in title or not window else f"{title} (W{hi - lo:.0f}/L{(lo + hi) / 2:.0f})",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(log_csv: Path, out_png: Path) -> bool:
    if not log_csv.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_csv)))
    if not rows:
        return False
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    loss = [float(r["loss"]) if r["loss"] else np.nan for r in rows]
    ax[0].plot(step, loss)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss")
    ax[0].set_yscale("log")
    vs = [(int(r["step"]), float(r["val_gain_db"])) for r in rows if r.get("val_gain_db")]
    if vs:
        ax[1].plot(*zip(*vs), marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("validation gain over input (dB)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def evaluate(model: str | os.PathLike, data: Sequence[str], out_dir: str | os.PathLike,
             real_low_dose: Sequence[str] = (), nps_reference: str | None = None, dose: float = 0.25,
             window: Sequence[float] | None = (-160.0, 240.0), baseline: str = "bm3d", max_slices: int = 8,
             seed: int = 1234, cache_dir: str | os.PathLike | None = None, write_card: bool = False,
             figures: bool = True, fbp_cutoff: float | None = None,
             progress: Callable[[str], None] = _quiet, detectability: Any = None,
             detectability_slices: int = 1) -> dict[str, Any]:
    """Score the model folder ``model`` on ``data`` (simulated dose) and ``real_low_dose`` series.

    Writes ``metrics.json``, ``table.md``, ``table.csv`` and one figure per series into ``out_dir`` (plus
    ``training_curves.png`` when the model sits in a run folder), and returns the metrics. ``write_card``
    stores the summary in the model's card (same weights, same sha256). ``progress`` is called with a short line
    per series and per step (``dicom-node evaluate`` prints them to stderr).

    ``detectability`` (a :class:`training.detectability.LCDSettings`) also runs the low-contrast detectability
    test on up to ``detectability_slices`` slices of the CT ``data`` series (one per series, in order), writing
    ``detectability.md`` and ``detectability.json`` and adding its summary to the metrics.
    """
    from models.folder import load_model_folder, update_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model_folder(model, "cpu")
    network, card = loaded.network, loaded.card
    cache = Path(cache_dir) if cache_dir else None
    reference = None
    if nps_reference:
        found = read_series(resolve_data_path(nps_reference))
        reference = found[0] if found else None
    results: list[SeriesResult] = []
    jobs = [(p, real) for paths, real in ((data, False), (real_low_dose, True)) for p in paths]
    for number, (p, real) in enumerate(jobs, 1):
        progress(f"folder {number}/{len(jobs)}: reading {p}")
        for series in read_series(resolve_data_path(p)):
            LOGGER.info("evaluating %s on %s (%s)", card.name, series.name, "real" if real else "simulated")
            res, images = evaluate_series(network, card, series, dose, window, baseline, max_slices, seed,
                                          cache, reference=reference, real=real, fbp_cutoff=fbp_cutoff,
                                          progress=progress)
            results.append(res)
            if figures:
                shown = display_window(images) if series.modality == "CT" else None
                save_figure(out / f"{series.name}-{res.kind}.png", f"{card.name}: {series.name} ({res.kind})",
                            images, shown)
    lcd = None
    if detectability is not None:
        lcd = run_detectability(network, card, data, detectability, detectability_slices, out, progress)
    table = table_markdown(results)
    (out / "table.md").write_text(table)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series", "input", "method", *_COLUMNS])
        for r in results:
            for m, row in r.rows.items():
                w.writerow([r.name, r.kind, m, *[row.get(c, "") for c in _COLUMNS]])
    metrics = {
        "model": card.name, "dose_fraction": dose, "window_hu": list(window) if window else None,
        "baseline": baseline, "seed": seed, "max_slices": max_slices, "fbp_cutoff": fbp_cutoff,
        "series": [{"name": r.name, "kind": r.kind, "slices": r.slices, "extra": r.extra, "rows": r.rows}
                   for r in results],
    }
    if lcd is not None:
        metrics["detectability"] = lcd
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    run_log = Path(model).resolve().parent / "log.csv"
    plot_training_curves(run_log, out / "training_curves.png")
    if write_card:
        card.metrics = card_metrics(metrics)
        update_card(card, model)
    return metrics


def run_detectability(network, card, data: Sequence[str], settings, max_slices: int, out: Path,
                      progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """The low-contrast detectability test (:mod:`training.detectability`) on up to ``max_slices`` slices of the CT
    series in ``data`` (the middle slice of each series with room for every insert in flat tissue)."""
    from training.detectability import network_denoiser, run_slice, summarise
    from training.detectability import table_markdown as lcd_table

    denoise = network_denoiser(network, card.normalization)
    results: list[dict[str, Any]] = []
    for p in data:
        for series in read_series(resolve_data_path(p)):
            if len(results) >= max_slices or series.modality != "CT":
                continue
            k = len(series.volume) // 2
            try:
                results.append(run_slice(series.volume[k], series.pixel_mm, denoise, settings, progress=progress,
                                         name=f"{series.name} {series.description}#{k}".strip()))
            except ValueError as exc:  # no room for the inserts in this slice's flat tissue
                LOGGER.info("detectability: %s", exc)
    summary = summarise(results, settings)
    summary["slices"] = results
    (out / "detectability.md").write_text(lcd_table(results))
    (out / "detectability.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A compact summary for ``card.toml``: per series, model / input / baseline numbers (rounded)."""
    out: dict[str, Any] = {"dose_fraction": metrics["dose_fraction"], "baseline": metrics["baseline"]}
    if metrics.get("window_hu"):
        out["window_hu"] = metrics["window_hu"]
    if metrics.get("fbp_cutoff") is not None:
        out["fbp_cutoff"] = metrics["fbp_cutoff"]
    for s in metrics["series"]:
        entry = {}
        for method, row in s["rows"].items():
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    entry[f"{method}_{k}"] = round(v, 4)
        out[f"{s['name']}-{s['kind']}".replace(".", "_")] = entry
    return out
