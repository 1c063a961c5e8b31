"""Check of the CT noise simulator against the Philips head phantom scanned at two doses.

What is compared: the noise SD in flat regions (median 15x15 local SD over the flat-region mask of
:func:`training.noise.flat_mask`, on slices from the central 60% of each series) and the noise texture (mean
frequency of the noise power spectrum of 32x32 flat ROIs).

How the flux is chosen: for each series, ``I0`` (incident quanta per detector bin and view of this simulator's
parallel-beam geometry) is the value for which the simulator's full-dose noise in the same flat regions has the
SD measured in the scan (self-calibration, :func:`training.data.calibrate_series_flux`). That is the flux the
training pairs and the evaluation use, for any series, so no scanner-specific constant is needed.

The cross-dose check: calibrated on the high-dose 2.5 mm series, the simulator predicts the SD of a scan at
relative dose ``d = (CTDIvol x thickness)_low / (CTDIvol x thickness)_high`` (quantum noise variance is inversely
proportional to the dose and to the slice thickness); the prediction is compared with what the low-dose series
measure. CTDIvol and thickness are read from the headers.

Run: ``python -m training calibrate-noise`` (or ``dicom-node calibrate-noise``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

HIGH = "ct/philips-head-phantom-highdose-2.5mm"
LOWS = ["ct/philips-head-phantom-lowdose-1mm", "ct/philips-head-phantom-lowdose-5mm"]


def _dose_and_thickness(folder: Path) -> tuple[float | None, float | None]:
    import pydicom

    for f in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if "SliceThickness" in ds:
            ctdi = ds.get("CTDIvol")
            return (float(ctdi) if ctdi is not None else None), float(ds.SliceThickness)
    return None, None


def _flat_slices(series, count: int = 3):
    from training.noise import flat_mask

    n = len(series.volume)
    out = []
    for i in np.linspace(0.2 * (n - 1), 0.8 * (n - 1), 9).round().astype(int):
        m = flat_mask(series.volume[i])
        if int(m.sum()) >= 200:
            out.append((int(i), m))
    step = max(1, len(out) // count)
    return out[::step][:count]


def run(seed: int = 0) -> dict:
    from training.data import NoiseSettings, calibrate_series_flux, ct_simulator, read_one_series, resolve_data_path
    from training.evaluate import flat_rois, nps, nps_summary
    from training.noise import noise_sd

    settings = NoiseSettings(seed=seed)
    sim = ct_simulator(settings)
    gen = torch.Generator().manual_seed(seed)
    report: dict = {"series": {}, "cross_dose": []}
    loaded = {}
    for name in [HIGH, *LOWS]:
        folder = resolve_data_path(name)
        series = read_one_series(folder)
        ctdi, thick = _dose_and_thickness(folder)
        flux, measured, simulated = calibrate_series_flux(series, settings)
        picks = _flat_slices(series)
        real_nps = nps([series.volume[i] for i, _ in picks], [flat_rois(m.numpy()) for _, m in picks], series.pixel_mm)
        sim_noise = [sim.full_dose_noise(torch.from_numpy(series.volume[i]), series.pixel_mm, flux, gen).numpy()
                     for i, _ in picks]
        sim_nps = nps(sim_noise, [flat_rois(m.numpy()) for _, m in picks], series.pixel_mm)
        report["series"][series.name] = {
            "ctdivol_mgy": ctdi, "thickness_mm": thick, "measured_sd_hu": round(measured, 3),
            "flux_I0": float(f"{flux:.4g}"), "simulated_full_dose_sd_hu": round(simulated, 3),
            "real_nps_mean_freq": round(nps_summary(real_nps, None).get("nps_mean_freq", float("nan")), 4),
            "simulated_nps_mean_freq": round(nps_summary(sim_nps, None).get("nps_mean_freq", float("nan")), 4),
        }
        loaded[name] = (series, flux, ctdi, thick, picks)
    high, flux_h, ctdi_h, thick_h, picks_h = loaded[HIGH]
    for name in LOWS:
        low, _, ctdi_l, thick_l, _ = loaded[name]
        if not (ctdi_h and ctdi_l and thick_h and thick_l):  # (no thickness: no CTDIvol either)
            continue
        d = (ctdi_l * thick_l) / (ctdi_h * thick_h)
        if d >= 1:
            predicted = float("nan")
        else:
            sds = [noise_sd(sim.simulate(torch.from_numpy(high.volume[i]), high.pixel_mm, flux_h, d, gen), m)
                   for i, m in picks_h]
            predicted = float(np.median(sds))
        report["cross_dose"].append({
            "from": high.name, "to": low.name, "relative_dose": round(d, 4),
            "predicted_sd_hu": round(predicted, 3),
            "measured_sd_hu": report["series"][low.name]["measured_sd_hu"],
            "flux_ratio_self_calibrated": round(report["series"][low.name]["flux_I0"] / flux_h, 4),
        })
    return report


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    report = run()
    text = json.dumps(report, indent=2)
    print(text)
    if getattr(args, "out", None):
        Path(args.out).write_text(text)
    return 0
